"""One full SDS iteration with the Stable Diffusion 2.1-base architecture (random weights, no download).

    python -m benchmarks.bench_sds [--device cpu|cuda] [--quick] [--json OUT] [--batches 1,4]
                                   [--attention sdpa,math,xformers] [--dtypes fp16,bf16,fp32]
                                   [--compile off,on] [--latent-modes vae,linear,warmup] [--model PATH_OR_ID]

One measurement = render (a learnable (B,3,64,64) image through a sigmoid, or ``render_fn`` passed to
``run``) -> ``guidance(images, cameras, "albedo", 0.5)``: resize to 512, VAE encode, one UNet call on
the [uncond; cond] batch (CFG scale 100), SDS surrogate loss -> ``loss.backward()`` through the VAE
encoder into the image -> Adam step. The UNet, VAE and scheduler are built from SD 2.1-base's configs
(written below) with random weights: the compute and memory are the real model's; only the text
encoder is a 1-layer stand-in (it runs once per prompt, outside the timed loop). ``--model`` loads
real weights instead (a local folder or a cached hub id).

Latent mode ``warmup`` measures the SD guidance inside its latent warm-up (``latent_warmup``: the render's
RGB and opacity are the latent; no VAE encoder), the step time that option saves against ``vae``.

``--quick`` uses the tiny test architecture (tests/tiny_models.py) so it runs on a CPU in seconds.
On the CPU without --quick only batch 1, fp32, sdpa, eager is measured (one real iteration takes
tens of seconds). Target (issue 6): <= 25 ms per iteration at batch 1 on an H100.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402

from . import common  # noqa: E402

# Stable Diffusion 2.1-base (stabilityai/stable-diffusion-2-1-base) component configs.
SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True, upcast_attention=False, dual_cross_attention=False,
)
SD21_BASE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, act_fn="silu", norm_num_groups=32,
    layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
SD21_BASE_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           num_train_timesteps=1000, clip_sample=False, steps_offset=1)
TEXT_DIM = 1024
DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4; CPU 1; quick 1,2)")
    p.add_argument("--attention", default=None,
                   help="comma-separated backends among xformers,sdpa,math (default: all available on CUDA; "
                        "CPU: sdpa; quick: sdpa,math)")
    p.add_argument("--dtypes", default=None, help="comma-separated fp16,bf16,fp32 (default CUDA fp16,bf16; CPU fp32)")
    p.add_argument("--compile", default=None, help="off,on (default CUDA off,on; CPU off)")
    p.add_argument("--latent-modes", default=None,
                   help="vae,linear,warmup (default CUDA vae,linear,warmup; CPU vae; quick all three)")
    p.add_argument("--model", default=None, help="real weights: local diffusers folder or cached hub id")
    p.add_argument("--resolution", type=int, default=64, help="render resolution (default 64)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _csv(value: Optional[str], default: List[str]) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else default


def _tiny_text_stack(folder: Path, dim: int, max_length: int):
    """Tokenizer + 1-layer CLIP text encoder of width ``dim`` (stand-in: embeddings are cached anyway)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(common.REPO_ROOT / "tests"))
    from tiny_models import make_tiny_clip_tokenizer

    tok = make_tiny_clip_tokenizer(folder, model_max_length=max_length)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=dim, intermediate_size=dim, num_hidden_layers=1,
                                       num_attention_heads=8, max_position_embeddings=max_length,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    return tok, enc


def build_guidance(device: str, dtype: torch.dtype, quick: bool, attention: str, latent_mode: str,
                   model: Optional[str] = None, seed: int = 0):
    """StableDiffusionGuidance on the SD 2.1-base architecture with random weights (or ``model``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from fastdream.guidance import GuidanceOptions, load_guidance
    from fastdream.guidance.stable_diffusion import StableDiffusionGuidance

    warmup = latent_mode == "warmup"  # the VAE path, inside the latent warm-up for the whole run
    opts = GuidanceOptions(attention=attention, latent_mode="vae" if warmup else latent_mode, seed=seed,
                           latent_warmup=1.0 if warmup else 0.0)
    if model:
        return load_guidance(model, device, dtype, options=opts)
    sys.path.insert(0, str(common.REPO_ROOT / "tests"))
    import tiny_models

    torch.manual_seed(seed)
    if quick:
        unet_cfg, vae_cfg, dim, max_len = tiny_models.tiny_unet_config(), tiny_models.tiny_vae_config(), 32, 16
    else:
        unet_cfg, vae_cfg, dim, max_len = SD21_BASE_UNET, SD21_BASE_VAE, TEXT_DIM, 77
    with tempfile.TemporaryDirectory() as tmp:
        tok, enc = _tiny_text_stack(Path(tmp), dim, max_len)
    init_device = torch.device(device) if common.device_type(device) == "cuda" else torch.device("cpu")
    with init_device:  # random init directly on the GPU (seconds instead of a minute for 865M parameters)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
    vae.decoder = None  # SDS only encodes
    sched = DDPMScheduler(**SD21_BASE_SCHEDULER)
    return StableDiffusionGuidance(tok, enc, unet, vae, sched, options=opts, device=device, dtype=dtype)


def _cameras(batch: int, device: str):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(elevation_deg=(torch.rand(batch, generator=g) * 100 - 10).to(device),
                           azimuth_deg=(torch.rand(batch, generator=g) * 360).to(device))


def run(args, render_fn: Optional[Callable[[int], torch.Tensor]] = None) -> Dict:
    """Benchmark; ``render_fn(batch) -> (B,3,H,W)`` images in [0,1] with grad replaces the learnable image
    (its parameters must then be optimised by the caller's closure; we only call backward)."""
    started = time.perf_counter()
    device = common.resolve_device(getattr(args, "device", None))
    cuda = common.device_type(device) == "cuda"
    quick = bool(getattr(args, "quick", False))
    from fastdream.guidance.loading import _xformers_available

    batches = [int(b) for b in _csv(args.batches, ["1", "2"] if quick else (["1", "4"] if cuda else ["1"]))]
    all_attn = (["xformers"] if (cuda and _xformers_available()) else []) + ["sdpa", "math"]
    attns = _csv(args.attention, all_attn if cuda else (["sdpa", "math"] if quick else ["sdpa"]))
    dtypes = _csv(args.dtypes, ["fp16", "bf16"] if cuda else ["fp32"])
    compiles = _csv(args.compile, ["off", "on"] if cuda else ["off"])
    modes = _csv(args.latent_modes, ["vae", "linear", "warmup"] if (cuda or quick) else ["vae"])
    repeats = common.repeats_for(args, full=20 if cuda else 2, quick=3)
    warmup = common.warmup_for(args, full=3 if cuda else 1, quick=1)
    res = int(getattr(args, "resolution", 64))
    results: List[Dict] = []
    notes: List[str] = []
    if not cuda and hasattr(os, "getloadavg"):
        notes.append(f"CPU load average at start (1/5/15 min): {os.getloadavg()} on {os.cpu_count()} cores; "
                     "other processes on a shared machine inflate and scatter CPU timings.")
    if not cuda and not quick:
        notes.append("CPU full mode: real SD 2.1-base UNet/VAE compute (random weights), fp32, batch 1 only.")

    for dname in dtypes:
        dtype = DTYPE_NAMES[dname]
        if not cuda and dtype == torch.float16:
            results.append(common.result_entry("sds_iteration", f"any/{dname}", skipped="fp16 not supported on CPU"))
            continue
        for mode in modes:
            g = build_guidance(device, dtype, quick, attns[0], mode, getattr(args, "model", None), args.seed)
            g.set_prompt("a DSLR photo of a hamburger")
            for attn in attns:
                try:
                    g.set_attention(attn)
                except Exception as exc:
                    results.append(common.result_entry("sds_iteration", f"{attn}/{dname}/-/{mode}",
                                                       skipped=str(exc)[:200]))
                    continue
                for comp in compiles:
                    g._unet_forward = torch.compile(g.unet) if comp == "on" else g.unet
                    if comp == "on":
                        torch._dynamo.reset()
                    for b in batches:
                        name = f"{attn}/{dname}/{'compile' if comp == 'on' else 'eager'}/{mode}"
                        image = torch.zeros(b, 3, res, res, device=device, requires_grad=True)
                        opt = torch.optim.Adam([image], lr=1e-2)
                        cams = _cameras(b, device)
                        render = render_fn or (lambda n: torch.sigmoid(image))

                        opacity = torch.ones(b, 1, res, res, device=device)

                        def step():
                            out = g(render(b), cams, "albedo", 0.5, opacity=opacity)
                            opt.zero_grad(set_to_none=True)
                            out.loss.backward()
                            opt.step()

                        try:
                            timing = common.time_fn(step, device, warmup=warmup + (2 if comp == "on" else 0),
                                                    repeats=repeats)
                            results.append(common.result_entry(
                                "sds_iteration", name, size=b, size_unit="images", timing=timing, work=b,
                                work_unit="images", attention=attn, dtype=dname, compile=comp == "on",
                                latent_mode=mode, resolution=g.resolution, render_resolution=res))
                        except Exception as exc:
                            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                            results.append(common.result_entry("sds_iteration", name, size=b, size_unit="images",
                                                               skipped=msg))
                        print(f"  {name} batch {b}: "
                              f"{results[-1]['median_ms'] if results[-1]['median_ms'] else results[-1]['skipped']}",
                              flush=True)
            del g
            if cuda:
                torch.cuda.empty_cache()

    b1 = [r for r in results if r.get("size") == 1 and r.get("median_ms") is not None
          and r.get("extra", {}).get("latent_mode") == "vae"]
    best = min((r["median_ms"] for r in b1), default=None)
    name = common.environment(device).get("device_name") or ""
    targets = [common.target("sds_iteration_b1_h100", "one SDS iteration at batch 1 (VAE path, best backend) on an "
                             "H100, ms", best, 25.0, op="<=", applies=(cuda and "H100" in name and not quick),
                             unit="ms")]
    config = {"architecture": "tiny test UNet/VAE" if quick else ("real weights: " + args.model if getattr(
        args, "model", None) else "SD 2.1-base (random weights)"), "unet": None if quick else SD21_BASE_UNET,
        "vae": None if quick else SD21_BASE_VAE, "batches": batches, "attention": attns, "dtypes": dtypes,
        "compile": compiles, "latent_modes": modes, "render_resolution": res, "guidance_scale": 100,
        "repeats": repeats, "warmup": warmup,
        "diffusers": common._package_version("diffusers"), "transformers": common._package_version("transformers")}
    return common.make_result("sds", args, config, results, targets=targets, started=started, notes=notes)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return common.finish(run(args), args)


if __name__ == "__main__":
    main()
