"""One full text-to-3D step: render -> SDS (Stable Diffusion 2.1-base architecture) -> backward -> Adam.

    python -m benchmarks.bench_iteration [--device cpu|cuda] [--quick] [--json OUT] [--batches 1,4]
                                         [--dtypes fp16,fp32] [--attention sdpa,math,xformers]
                                         [--compile off,on] [--architecture sd21|tiny] [--model PATH_OR_ID]

One measurement is what `fastdream run` does per step (minus the occupancy-grid update every 16
steps and logging): ``renderer.render(cameras)`` at 64x64 with gradients (the synthetic demo-scene
field of bench_render), ``guidance(images, cameras, shading, progress)`` (resize to 512, VAE
encoder, one UNet call on the [uncond; cond] batch, CFG), ``loss.backward()`` through the VAE
encoder and the renderer into the hash table and MLPs, ``optimizer.step()``. The guidance is built by
bench_sds.build_guidance: SD 2.1-base UNet/VAE from their configs with random weights.

Architecture: ``sd21`` (default on CUDA) or ``tiny`` (the test UNet/VAE; default on the CPU and in
--quick, since one real SD iteration takes minutes on a small CPU -- bench_sds measures that one).
Per ops backend (native / torch reference), dtype, attention backend, torch.compile of the UNet, batch.
Peak memory per configuration. Target (issues): a full SDS iteration <= 25 ms at batch 1 on an H100.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402

from . import common  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4; quick 1)")
    p.add_argument("--dtypes", default=None, help="guidance dtypes among fp16,bf16,fp32 (default CUDA fp16,fp32; CPU fp32)")
    p.add_argument("--attention", default=None, help="among xformers,sdpa,math (default CUDA: all available; CPU sdpa)")
    p.add_argument("--compile", default=None, help="off,on: torch.compile the UNet (default CUDA off,on; CPU off)")
    p.add_argument("--backends", default=None, help="ops backends among native,torch (default: both on CUDA/quick, native on the CPU)")
    p.add_argument("--architecture", default=None, choices=("sd21", "tiny"),
                   help="diffusion architecture (default: sd21 on CUDA, tiny on the CPU and in --quick)")
    p.add_argument("--model", default=None, help="real weights instead (local diffusers folder or cached hub id)")
    p.add_argument("--resolution", type=int, default=None, help="render size (default 64; quick 16)")
    p.add_argument("--shading", default="lambertian", choices=("albedo", "lambertian", "textureless"))
    p.add_argument("--seed", type=int, default=0)
    return p


def _csv(value: Optional[str], default: List[str]) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else list(default)


def run(args) -> Dict:
    started = time.perf_counter()
    device = common.resolve_device(args.device)
    cuda = common.device_type(device) == "cuda"
    quick = bool(args.quick)
    from . import bench_render, bench_sds
    from fastdream.cameras import sample_cameras
    from fastdream.guidance.loading import _xformers_available

    arch = args.architecture or ("sd21" if (cuda and not quick) else "tiny")
    batches = [int(b) for b in _csv(args.batches, ["1"] if quick else ["1", "4"])]
    attns = _csv(args.attention, ((["xformers"] if _xformers_available() else []) + ["sdpa", "math"]) if cuda
                 else ["sdpa"])
    dtypes = _csv(args.dtypes, ["fp16", "fp32"] if cuda else ["fp32"])
    compiles = _csv(args.compile, ["off", "on"] if (cuda and not quick) else ["off"])
    status = common.available_backends(device)
    backends = _csv(args.backends, ["native", "torch"] if (cuda or quick) else ["native"])
    res = args.resolution or (16 if quick else 64)
    repeats = common.repeats_for(args, full=20 if cuda else 2, quick=2)
    warmup = common.warmup_for(args, full=3 if cuda else 1, quick=1)

    renderer, field_info = bench_render.synthetic_renderer(device, seed=args.seed,
                                                           log2_hashmap_size=(14 if quick else 19),
                                                           grid_resolution=(32 if quick else 64))
    renderer.train()
    initial = {k: v.detach().clone() for k, v in renderer.state_dict().items()}
    results: List[Dict] = []
    notes: List[str] = []
    if arch == "tiny" and not args.model:
        notes.append("tiny test UNet/VAE (not SD 2.1-base): measures the engine's share of a step; the real "
                     "SD 2.1-base SDS cost on this device is in sds_<device>.json")
    for dname in dtypes:
        dtype = DTYPES[dname]
        if not cuda and dtype == torch.float16:
            results.append(common.result_entry("iteration", f"any/{dname}", skipped="fp16 not supported on the CPU"))
            continue
        try:
            g = bench_sds.build_guidance(device, dtype, arch == "tiny", attns[0], "vae", args.model, args.seed)
            g.set_prompt("a DSLR photo of a hamburger")
        except Exception as exc:
            results.append(common.result_entry("iteration", f"any/{dname}", skipped=f"guidance: {type(exc).__name__}: {exc}"[:300]))
            continue
        for attn in attns:
            try:
                g.set_attention(attn)
            except Exception as exc:
                results.append(common.result_entry("iteration", f"-/{attn}/{dname}", skipped=str(exc)[:300]))
                continue
            for comp in compiles:
                if comp == "on":
                    torch._dynamo.reset()
                g._unet_forward = torch.compile(g.unet) if comp == "on" else g.unet
                for backend in backends:
                    for b in batches:
                        name = f"{backend}/{attn}/{dname}/{'compile' if comp == 'on' else 'eager'}"
                        if status.get(backend) is not None:
                            results.append(common.result_entry("iteration", name, b, "images",
                                                               skipped=f"ops backend unavailable: {status[backend]}"))
                            continue
                        renderer.load_state_dict(initial)
                        opt = torch.optim.Adam([
                            {"params": [renderer.field.encoding_params], "lr": 1e-2},
                            {"params": list(renderer.field.mlp_parameters()) + list(renderer.background.parameters()),
                             "lr": 1e-3}], betas=(0.9, 0.99), eps=1e-15)
                        cams = sample_cameras(b, res, res, scene_radius=renderer.field.scene_radius,
                                              generator=torch.Generator().manual_seed(args.seed + b), device=device)
                        counts = {}

                        def step():
                            out = renderer.render(cams, shading=args.shading)
                            counts["samples"] = out.n_samples
                            images = out.rgb.permute(0, 3, 1, 2)
                            sds = g(images, cams, args.shading, 0.5)
                            opt.zero_grad(set_to_none=True)
                            sds.loss.backward()
                            opt.step()

                        with common.backend_env(backend):
                            try:
                                timing = common.time_fn(step, device, warmup=warmup + (2 if comp == "on" else 0),
                                                        repeats=repeats)
                            except Exception as exc:
                                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                                results.append(common.result_entry("iteration", name, b, "images", skipped=msg))
                                print(f"  {name} batch {b}: {msg}", flush=True)
                                continue
                        results.append(common.result_entry(
                            "iteration", name, b, "images", timing, work=b, work_unit="images", ops_backend=backend,
                            attention=attn, dtype=dname, compile=comp == "on", render_resolution=res,
                            shading=args.shading, samples_per_ray=counts.get("samples", 0) / (b * res * res),
                            architecture=arch if not args.model else args.model))
                        print(f"  {name} batch {b}: {results[-1]['median_ms']:.1f} ms", flush=True)
        del g
        if cuda:
            torch.cuda.empty_cache()

    ok = [r for r in results if r["median_ms"] is not None]
    ratios = []
    for r in ok:
        if r["extra"]["ops_backend"] == "native":
            other = r["backend"].replace("native/", "torch/", 1)
            ratios.append(common.ratio(f"iteration {other.split('/', 1)[1]} b{r['size']}: native vs reference ops",
                                       results, "iteration", r["backend"], other, size=r["size"]))
    ratios = [q for q in ratios if q["value"] is not None] or ratios[:1]
    best = min((r["median_ms"] for r in ok if r["size"] == 1 and r["extra"]["ops_backend"] == "native"), default=None)
    name = common.environment(device).get("device_name") or ""
    targets = [common.target("full_iteration_b1_h100", "full text-to-3D step (render + SD 2.1-base SDS + backward + "
                             "Adam) at batch 1 on an H100, ms", best, 25.0, "<=",
                             applies=(cuda and "H100" in name and arch == "sd21"), unit="ms")]
    config = {"architecture": arch if not args.model else args.model, "batches": batches, "attention": attns,
              "dtypes": dtypes, "compile": compiles, "ops_backends": backends, "backend_status": status,
              "render_resolution": res, "shading": args.shading, "repeats": repeats, "warmup": warmup,
              "field": field_info, "guidance_scale": 100, "excluded": "occupancy-grid update (every 16 steps), logging"}
    return common.make_result("iteration", args, config, results, ratios, targets, started, notes)


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.finish(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
