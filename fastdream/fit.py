"""`fastdream fit`: fit the radiance field to posed images (NeRF-synthetic / instant-ngp format).

This proves the engine (hash encoding, occupancy grid, marching, compositing) on a problem with a known
answer: held-out views must come out right. `fastdream fit --demo` renders a small synthetic scene
(fastdream.demo), writes it as a NeRF-format folder and fits it, offline, on a CPU in about a minute.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from . import _backend, atomic
from .checkpoint import checkpoint_name, save_checkpoint
from .data import PosedImages, load_dataset
from .errors import FastDreamError
from .export import psnr_from_mse
from .field import FieldConfig
from .output_folder import check_output_folder, clear_outputs, is_nonempty, refuse_overlap
from .regularizers import distortion_loss
from .renderer import RenderConfig, Renderer, build_renderer
from .runtime import resolve_device

log = logging.getLogger("fastdream")

DEMO_PSNR_TARGET = 25.0


@dataclass
class FitConfig:
    steps: int = 2000
    rays_per_step: int = 4096
    # A sample budget instead of a ray count (instant-ngp's target batch size): the rays of each step are
    # budget / (kept samples per ray of the last step), at most rays_per_step, in multiples of 64.
    samples_per_step: Optional[int] = None
    lr_encoding: float = 1e-2
    lr_mlp: float = 1e-2
    final_lr_factor: float = 0.1      # exponential decay to lr * factor at the last step
    grid_resolution: int = 64
    grid_update_every: int = 16
    # instant-ngp's schedule: update every clamp(step // grid_update_every, 1, grid_update_every) steps, so the
    # grid follows the quickly changing field of the first hundred steps (empty space is pruned within tens of
    # steps, not hundreds); False: every grid_update_every steps from the start.
    grid_update_ramp: bool = False
    # The grid's opacity estimate is density * a step: None takes the render step (box diagonal / samples_per_ray);
    # N takes instant-ngp's finest step, the central box's diagonal / N (instant-ngp: 1024 across its unit cube),
    # so the density a cell needs to stay occupied does not fall as aabb_scale enlarges the box and the render step.
    grid_reference_steps: Optional[int] = None
    grid_warmup_steps: int = 256
    grid_ema_decay: float = 0.95
    background: tuple = (1.0, 1.0, 1.0)
    # instant-ngp's random_bg_color: each training ray is composited over its own random colour (the target
    # too, through the image's alpha), so the field cannot explain a pixel by letting the background through.
    random_background: bool = False
    # Weight of mip-NeRF 360's distortion loss (fastdream.regularizers.distortion_loss), 0: off.
    distortion_weight: float = 0.0
    # > 0: near-camera gradient scaling ("Floaters No More"; RenderConfig.near_gradient_distance) at this
    # fraction of the training cameras' mean distance to the scene's centre; 0: off.
    near_gradient_fraction: float = 0.0
    seed: int = 0
    max_test_views: Optional[int] = None


def demo_configs(steps: Optional[int] = None):
    """Sizes for the demo: small enough for ~a minute on two CPU cores with the PyTorch reference ops."""
    field = FieldConfig(n_levels=8, log2_hashmap_size=16, base_resolution=8, max_resolution=128, hidden_dim=32,
                        n_hidden_layers=1, blob_density=0.0)
    render = RenderConfig(samples_per_ray=96, early_stop_eps=1e-3)
    # A fast-decaying occupancy EMA, updated often: empty space is pruned within tens of steps, not hundreds.
    # A high hash-table learning rate: ~34 dB held-out after 150 steps (25 dB is reached near step 75).
    fit = FitConfig(steps=steps or 150, rays_per_step=2048, lr_encoding=3e-2, grid_resolution=32, grid_update_every=4,
                    grid_warmup_steps=64, grid_ema_decay=0.7)
    return field, render, fit


def default_configs(steps: Optional[int] = None):
    """`fastdream fit` on real captures, sized for a CPU (measured on instant-ngp's fox at 135 px wide on two
    cores: benchmarks/results/fox_cpu.json)."""
    # Untrained space is transparent and stays so, as in instant-ngp: density e^-3 = 0.05 and no MLP biases, so
    # where the hash features are untouched (space no ray constrains: occluded, behind the walls) the density
    # cannot drift up with the rest of the scene, and those cells drop out of the grid.
    # 12 levels up to 1024 and a 2^17 table (instant-ngp: 16 levels, 2^19, on a GPU): at 135 px the pixel
    # footprint at the fox is ~1/400 of the box, so finer levels add no detail; the encoding is half the step's
    # time and the 2^19 table's gradient, zeroing and Adam update cost ~0.1 s per step on their own (16 levels,
    # 2^19: 0.6-0.7 s per step for the same samples; 12 levels, 2^17: 0.3-0.45 s and the same held-out PSNR
    # after 300 steps).
    field = FieldConfig(n_levels=12, log2_hashmap_size=17, base_resolution=16, max_resolution=1024, hidden_dim=64,
                        n_hidden_layers=1, blob_density=0.0, density_bias=-3.0, mlp_bias=False)
    render = RenderConfig(samples_per_ray=512)
    # Instant-ngp's grid: updates every step at first, every 16 after 256 steps; a cell's opacity measured at its
    # finest step (1/1024 of the central cube's diagonal) rather than the render step (1/512 of the box's
    # diagonal, 8x longer on an aabb_scale-4 box, which lowered the density a cell needs to stay occupied 8x).
    # A sample budget rather than a ray count (instant-ngp's target batch): 48k samples is ~0.06 s per step here.
    # Near-camera gradient scaling ("Floaters No More") at 0.4 of the cameras' distance: without it the fox's
    # held-out PSNR after 3,000 steps is 15-18 dB depending on the seed, with haze in front of the cameras; with
    # it 23.6 dB over seeds 0-2 (0.2 to 1.0 of the distance: 21.7-23.7 dB).
    fit = FitConfig(steps=steps or 2000, grid_update_ramp=True, grid_reference_steps=1024, samples_per_step=49152,
                    near_gradient_fraction=0.4)
    return field, render, fit


def grid_update_due(step: int, config: FitConfig) -> bool:
    """Whether the fit loop updates the occupancy grid before training step `step` (1-based)."""
    every = config.grid_update_every
    if config.grid_update_ramp:
        every = min(max(step // config.grid_update_every, 1), config.grid_update_every)
    return step == 1 or step % every == 0


def near_gradient_distance(data: PosedImages, config: FitConfig) -> float:
    """RenderConfig.near_gradient_distance for a fit: config.near_gradient_fraction of the mean distance from
    the training cameras to the centre of the scene's central box (0 when off)."""
    if config.near_gradient_fraction <= 0:
        return 0.0
    box = data.central_box
    centre = (box[:3] + box[3:]) * 0.5
    return float(torch.linalg.vector_norm(data.c2w[:, :3, 3] - centre, dim=-1).mean()) * config.near_gradient_fraction


def grid_opacity_step(data: PosedImages, render_step: float, config: FitConfig) -> float:
    """The step the occupancy grid multiplies densities by (see FitConfig.grid_reference_steps)."""
    if config.grid_reference_steps is None:
        return render_step
    box = data.central_box
    return float(torch.linalg.vector_norm(box[3:] - box[:3])) / config.grid_reference_steps


def rays_for_budget(budget: int, samples: int, rays: int, max_rays: int, granularity: int = 64) -> int:
    """Rays for the next step so that its samples meet `budget`, from the last step's `samples` over `rays`."""
    per_ray = max(samples, 1) / rays
    return int(min(max(budget / per_ray // granularity, 1) * granularity, max_rays))


def pixel_rays(data: PosedImages, image_idx: torch.Tensor, px: torch.Tensor, py: torch.Tensor):
    """World rays through image coordinates (px, py) (pixel units, 0 = left/top edge) of the given images.
    Same pinhole and OpenGL convention as fastdream.cameras.generate_rays."""
    u = (px - data.cx[image_idx]) / data.fx[image_idx]
    v = (py - data.cy[image_idx]) / data.fy[image_idx]
    dirs_cam = torch.stack([u, -v, -torch.ones_like(u)], dim=-1)
    c2w = data.c2w[image_idx]
    dirs = torch.nn.functional.normalize((c2w[:, :3, :3] @ dirs_cam[..., None])[..., 0], dim=-1)
    return c2w[:, :3, 3].contiguous(), dirs


@torch.no_grad()
def evaluate(renderer: Renderer, data: PosedImages, background: torch.Tensor, device) -> Dict[str, object]:
    """Render every view of data; mean per-image PSNR (the NeRF convention) and the predictions."""
    renderer.eval()
    preds, psnrs = [], []
    for k in range(len(data)):
        cams = data.subset([k]).cameras.to(device)
        out = renderer.render(cams, shading="albedo", background=background)
        pred = out.rgb[0].clamp(0.0, 1.0).cpu()
        mse = float(((pred - data.images[k]) ** 2).mean())
        psnrs.append(psnr_from_mse(mse))
        preds.append(pred)
    renderer.train()
    return {"psnr": float(np.mean(psnrs)), "psnr_per_view": psnrs, "predictions": preds}


def fit(train: PosedImages, test: PosedImages, out_dir: Path, field_config: FieldConfig, render_config: RenderConfig,
        config: FitConfig, device="cpu", progress: bool = True, on_step=None) -> Dict[str, object]:
    """Fit the field to train, evaluate on test; write a checkpoint and metrics.json into out_dir. Returns the metrics.
    on_step(step, renderer, loss), if given, is called after every step (experiments, tests)."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = torch.device(device)
    background = torch.tensor(config.background, dtype=torch.float32, device=device)
    if config.near_gradient_fraction > 0:
        render_config = replace(render_config, near_gradient_distance=near_gradient_distance(train, config))
    renderer = build_renderer(train.aabb.tolist(), field_config, render_config, background="fixed",
                              background_color=config.background, grid_resolution=config.grid_resolution,
                              grid_kwargs={"warmup_steps": config.grid_warmup_steps, "ema_decay": config.grid_ema_decay,
                                           "mean_box": None if train.centre_aabb is None else train.centre_aabb.tolist()}).to(device)
    field = renderer.field
    # Space no training view sees is unconstrained: keep it out of the grid (instant-ngp does the same).
    renderer.grid.mark_invisible_cells(train.c2w, train.fx, train.fy, train.cx, train.cy, train.width, train.height)
    optimizer = torch.optim.Adam([
        {"params": [field.encoding_params], "lr": config.lr_encoding},
        {"params": list(field.mlp_parameters()), "lr": config.lr_mlp, "weight_decay": 1e-6},
    ], betas=(0.9, 0.99), eps=1e-15)
    gamma = config.final_lr_factor ** (1.0 / max(config.steps, 1))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)
    grid_step = grid_opacity_step(train, renderer.step_size, config)
    opacity_fn = lambda x: field.density(x) * grid_step  # noqa: E731

    n_images, H, W = len(train), train.height, train.width
    pixels = train.images.reshape(-1, 3)
    alphas = None if train.alphas is None else train.alphas.reshape(-1)
    train_dev = PosedImages(**{**train.__dict__, **{k: getattr(train, k).to(device) for k in ("c2w", "fx", "fy", "cx", "cy")}})
    start = time.perf_counter()
    bar = tqdm(range(1, config.steps + 1), desc="fit", unit="step", disable=not progress, dynamic_ncols=True, mininterval=0.5)
    loss_value, psnr_value = float("nan"), float("nan")
    n_rays = config.rays_per_step
    total_rays = total_samples = 0
    for step in bar:
        if grid_update_due(step, config):
            renderer.grid.update(step, opacity_fn, generator=None)
        flat = torch.randint(0, n_images * H * W, (n_rays,), generator=generator)
        image_idx, rem = flat // (H * W), flat % (H * W)
        py = (rem // W).float() + torch.rand(flat.shape, generator=generator)  # jitter inside the pixel
        px = (rem % W).float() + torch.rand(flat.shape, generator=generator)
        target = pixels[flat].to(device)
        ray_background = background
        if config.random_background:
            ray_background = torch.rand(n_rays, 3, generator=generator).to(device)
            if alphas is not None:  # the images were composited over config.background when they loaded
                target = target + (1.0 - alphas[flat].to(device))[:, None] * (ray_background - background)
        origins, dirs = pixel_rays(train_dev, image_idx.to(device), px.to(device), py.to(device))
        out = renderer.render_rays(origins, dirs, shading="albedo", background=ray_background)
        mse = torch.nn.functional.mse_loss(out.rgb, target)
        loss = mse
        if config.distortion_weight > 0:
            loss = loss + config.distortion_weight * distortion_loss(out.weights, out.t_starts, out.t_ends,
                                                                     out.ray_indices, n_rays)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_rays, total_samples = total_rays + n_rays, total_samples + out.weights.shape[0]
        if config.samples_per_step is not None:
            n_rays = rays_for_budget(config.samples_per_step, out.weights.shape[0], n_rays, config.rays_per_step)
        if step % 10 == 0 or step == config.steps:
            loss_value = float(mse.detach())
            psnr_value = psnr_from_mse(loss_value)
            bar.set_postfix(loss=f"{loss_value:.4f}", psnr=f"{psnr_value:.2f}", occ=f"{renderer.grid.occupied_fraction():.2f}", refresh=False)
        if on_step is not None:
            on_step(step, renderer, float(mse.detach()))
    bar.close()
    train_seconds = time.perf_counter() - start

    eval_start = time.perf_counter()
    eval_data = test if config.max_test_views is None else test.subset(range(min(len(test), config.max_test_views)))
    result = evaluate(renderer, eval_data, background, device)
    eval_seconds = time.perf_counter() - eval_start

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(out_dir / "checkpoints" / checkpoint_name(config.steps), {
        "kind": "fit",
        "step": config.steps,
        "field": field.state_dict(),
        "occupancy": renderer.grid.state_dict(),
        "field_config": asdict(field_config),
        "render_config": asdict(render_config),
        "fit_config": {**asdict(config), "background": list(config.background)},
        "aabb": train.aabb.tolist(),
        "background_color": list(config.background),
        "psnr": result["psnr"],
    })
    _write_views(out_dir / "test_views", result["predictions"], eval_data, limit=8)
    metrics = {
        "psnr": result["psnr"],
        "psnr_per_view": result["psnr_per_view"],
        "steps": config.steps,
        "seconds": train_seconds + eval_seconds,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "final_train_loss": loss_value,
        "final_train_psnr": psnr_value,
        "backend": _backend.backend_name(device),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "n_train": len(train),
        "n_test": len(eval_data),
        "resolution": [train.width, train.height],
        "rays_per_step": config.rays_per_step,
        "samples_per_step": config.samples_per_step,
        "mean_rays_per_step": total_rays / config.steps,
        "mean_samples_per_step": total_samples / config.steps,
        "occupied_fraction": renderer.grid.occupied_fraction(),
        "checkpoint": str(ckpt.relative_to(out_dir)),
        "train_source": str(train.source),
        "test_source": str(test.source),
    }
    atomic.write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _write_views(folder: Path, predictions, data: PosedImages, limit: int) -> None:
    """Predicted | ground truth side by side, for the first few held-out views."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, pred in enumerate(predictions[:limit]):
        pair = torch.cat([pred, data.images[k]], dim=1).numpy()
        with atomic.temporary_path(folder / f"view_{k:03d}.png") as tmp:
            Image.fromarray((pair * 255.0 + 0.5).clip(0, 255).astype(np.uint8)).save(tmp)


FIT_OUTPUTS = ("checkpoints", "test_views", "metrics.json", "demo_data")


def prepare_out_dir(out: Path, force: bool, data: Optional[Path] = None) -> None:
    """Refuse an unusable or occupied --out (or one holding the dataset); with force, remove only fit's outputs."""
    check_output_folder(out)
    refuse_overlap(out, [data])
    if is_nonempty(out) and not force:
        raise FastDreamError(f"The output folder {out} already exists and is not empty. fastdream will not overwrite "
                             "an earlier run: choose another --out, or pass --force to replace its fit outputs "
                             f"({', '.join(FIT_OUTPUTS)}; other files are left alone).")


def _parse_background(text: str):
    names = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
    if text in names:
        return names[text]
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise FastDreamError(f"--background {text!r} is not understood; use white, black or three values in [0, 1] like 0.5,0.5,0.5.")
    return values


def fit_folder(out, data=None, demo: bool = False, force: bool = False, steps: Optional[int] = None,
               resolution: Optional[int] = None, rays: Optional[int] = None, background: str = "white", seed: int = 0,
               device: Optional[str] = None, max_test_views: Optional[int] = None, threads: Optional[int] = None,
               near_gradient: Optional[float] = None, progress: bool = True) -> Dict[str, object]:
    """`fastdream fit` as a function: fit DATA (a dataset folder) or the demo scene, writing the checkpoint,
    metrics.json and held-out views to `out`; returns the metrics."""
    for flag, value in (("--steps", steps), ("--rays", rays), ("--resolution", resolution),
                        ("--max-test-views", max_test_views), ("--threads", threads)):
        if value is not None and value < 1:
            raise FastDreamError(f"{flag} must be at least 1, got {value}.")
    if near_gradient is not None and not near_gradient >= 0:
        raise FastDreamError(f"--near-gradient must be a fraction >= 0 (0: off), got {near_gradient}.")
    if demo and data is not None:
        raise FastDreamError("Give either a DATA_DIR or --demo, not both.")
    if not demo and data is None:
        raise FastDreamError("Give a DATA_DIR (a folder with transforms.json, or transforms_train.json + transforms_test.json), or --demo.")
    if out is None:
        if not demo:
            raise FastDreamError("Give --out OUT, the folder for the checkpoint and metrics.json.")
        out = "fastdream-fit-demo"
    out = Path(out)
    _backend.requested_backend()  # a bad FASTDREAM_BACKEND is reported before any data is read
    background = _parse_background(background)
    device = str(resolve_device(device))
    if threads is not None:
        torch.set_num_threads(threads)
    prepare_out_dir(out, force, None if demo else Path(data))
    t0 = time.perf_counter()
    if demo:
        from .demo import write_demo_dataset

        clear_outputs(out, FIT_OUTPUTS)
        data_dir = write_demo_dataset(out / "demo_data")
        field_config, render_config, config = demo_configs(steps)
        train, test = load_dataset(data_dir, resolution=resolution, background=background)
    else:
        data_dir = Path(data)
        field_config, render_config, config = default_configs(steps)
        train, test = load_dataset(data_dir, resolution=resolution, background=background)
        clear_outputs(out, FIT_OUTPUTS)  # only once the data has loaded: a typo in DATA_DIR must not cost the old fit
    prep_seconds = time.perf_counter() - t0
    config.background, config.seed, config.max_test_views = background, seed, max_test_views
    if rays is not None:
        config.rays_per_step = rays
    if near_gradient is not None:
        config.near_gradient_fraction = near_gradient
    log.info("fastdream fit: %d training and %d held-out views at %dx%d, %d steps, %s backend on %s",
             len(train), len(test), train.width, train.height, config.steps, _backend.backend_name(device), device)
    metrics = fit(train, test, out, field_config, render_config, config, device=device, progress=progress)
    metrics["prep_seconds"] = prep_seconds
    atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    metrics["out"] = str(out)
    return metrics
