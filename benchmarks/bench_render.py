"""Full render forward + backward of a trained-looking field, per ops backend and resolution.

    python -m benchmarks.bench_render [--device cpu|cuda] [--quick] [--json OUT] [--checkpoint CKPT]
                                      [--resolutions 64,128,256,512] [--batch 1] [--shading lambertian]

The field is a checkpoint's (``--checkpoint``: a ``fastdream fit`` or ``fastdream run`` checkpoint with
"field" / "occupancy" state) or, by default, a synthetic one: the demo scene (two spheres and a box) written
into the hash grid with an MLP that passes it through (see ``synthetic_renderer``), and the
occupancy grid updated from it -- so rays march through a realistic shell of occupied cells and stop
at opaque surfaces, as in training, rather than through an empty box.

One measurement = ``renderer.render(cameras, shading)`` with gradients (marching, the no-grad density
pass for early termination, the field query with normals, fused compositing + shading, background)
then ``loss.backward()`` into the hash table and MLPs. Cameras are DreamFusion's random training
cameras from a fixed seed, identical for every backend. Backends are switched in-process with
fastdream.ops.use_backend (torch = the PyTorch reference ops, native = the C++/CUDA extension); the field is
the same tensor for both. Reported per resolution: ms (median, IQR), rays/s, samples per ray, peak memory.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402

from . import common  # noqa: E402

BACKENDS = ("native", "torch")


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="render this checkpoint's field instead of the synthetic one")
    p.add_argument("--resolutions", default=None, help="comma-separated image sizes (default: 64,128,256,512 on CUDA, "
                                                        "64,128 on the CPU; quick: 8,16)")
    p.add_argument("--batch", type=int, default=1, help="images per render (DreamFusion: 1)")
    p.add_argument("--shading", default="lambertian", choices=("albedo", "lambertian", "textureless"),
                   help="shading mode (lambertian/textureless need normals: 3x more field queries)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of native,torch")
    p.add_argument("--reference-max-resolution", type=int, default=None,
                   help="largest image size the slow PyTorch reference renders (default: 64 on the CPU, all on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------------------------------------- fields
def _dense_level(layout) -> int:
    """The finest level of the hash grid that is indexed densely (no hash collisions)."""
    dense = [l for l, hashed in enumerate(layout.hashed) if not hashed]
    return dense[-1] if dense else 0


@torch.no_grad()
def synthetic_renderer(device: str, seed: int = 0, log2_hashmap_size: int = 19, scene_resolution: int = 64,
                       grid_resolution: int = 64):
    """A renderer whose field holds the demo scene (two spheres and a box) -- built, not fitted.

    The finest densely indexed hash-grid level stores the scene's log-density (feature 0) and an
    object-dependent colour coordinate (feature 1) at its vertices; the MLP is set to pass those two
    features through (ReLU pairs) to density and albedo, plus small random weights on every other
    input so gradients reach the whole table. Surfaces are therefore as sharp as that level allows,
    rays stop at them like in a trained field, and the occupancy grid updated from the field marks a
    realistic set of cells. Costs the same per sample as any field; built in well under a second.
    """
    from fastdream import ops
    from fastdream.demo import demo_scene, sample_voxels
    from fastdream.field import FieldConfig
    from fastdream.renderer import RenderConfig, build_renderer

    torch.manual_seed(seed)
    scene = demo_scene(resolution=scene_resolution)
    field_cfg = FieldConfig(blob_density=0.0, log2_hashmap_size=log2_hashmap_size)
    renderer = build_renderer(scene["aabb"].tolist(), field_cfg, RenderConfig(), background="mlp",
                              grid_resolution=grid_resolution)
    field = renderer.field
    layout = ops.hash_grid_layout(**field.encoding_kwargs)
    level = _dense_level(layout)
    res, scale, F = layout.resolutions[level], layout.scales[level], layout.n_features_per_level
    # vertex i sits at unit coordinate (i - 0.5) / scale (tcnn's half-cell offset); dense index x + y*r + z*r^2
    r = torch.arange(res, dtype=torch.float32)
    unit_coord = ((r - 0.5) / scale).clamp(0.0, 1.0)
    z, y, x = torch.meshgrid(unit_coord, unit_coord, unit_coord, indexing="ij")
    unit = torch.stack([x, y, z], dim=-1).reshape(-1, 3)  # order: x fastest
    aabb = torch.as_tensor(scene["aabb"])
    density, albedo = sample_voxels(scene, aabb[:3] + unit * (aabb[3:] - aabb[:3]))
    log_density = torch.log(density + 1e-3).clamp(-8.0, 5.0)
    colour = (albedo @ torch.tensor([1.0, -1.0, 0.5])) * 2.0  # a scalar coordinate that differs per object
    table = field.encoding_params.data.view(-1, F)
    start = layout.offsets[level]
    table[start:start + res**3, 0] = log_density
    table[start:start + res**3, 1] = colour
    lin1, lin2, lin3 = [m for m in field.mlp if isinstance(m, torch.nn.Linear)][:3] if field_cfg.n_hidden_layers == 2 else (None,) * 3
    if lin1 is None:
        raise RuntimeError("synthetic field expects the default 2-hidden-layer MLP")
    for lin in (lin1, lin2, lin3):
        lin.weight.normal_(0.0, 1e-3)
        lin.bias.zero_()
    f0, f1 = level * F, level * F + 1
    lin1.weight[0, f0], lin1.weight[1, f0], lin1.weight[2, f1], lin1.weight[3, f1] = 1.0, -1.0, 1.0, -1.0
    lin2.weight[:4, :4] = torch.eye(4)
    lin3.weight[0, :4] = torch.tensor([1.0, -1.0, 0.0, 0.0])
    for k, gain in zip((1, 2, 3), (1.5, -1.0, 0.7)):
        lin3.weight[k, :4] = torch.tensor([0.0, 0.0, gain, -gain])
    lin3.bias[1:] = torch.tensor([0.2, 0.0, -0.2])
    renderer = renderer.to(device)
    renderer.grid.update(0, lambda p: renderer.field.density(p) * renderer.step_size)
    return renderer, {"kind": "synthetic",
                      "scene": "fastdream.demo scene (2 spheres + box) written into the densest dense hash-grid level",
                      "level": level, "level_resolution": res, "grid_resolution": grid_resolution,
                      "field": {"log2_hashmap_size": log2_hashmap_size, "n_levels": field_cfg.n_levels,
                                "blob_density": field_cfg.blob_density}}


def checkpoint_renderer(path: str, device: str):
    """A renderer holding a fastdream checkpoint's field, background and occupancy grid."""
    from dataclasses import fields as dc_fields

    from fastdream.checkpoint import load_checkpoint
    from fastdream.field import FieldConfig
    from fastdream.renderer import RenderConfig, build_renderer

    state = load_checkpoint(path)
    config = state.get("config") if isinstance(state.get("config"), dict) else {}

    def cfg(cls, key):
        raw = state.get(f"{key}_config") or config.get(key) or {}
        names = {f.name for f in dc_fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names})

    aabb = state.get("aabb") or config.get("aabb") or (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)
    field_state = state.get("field") or {}
    grid_state = state.get("occupancy") or state.get("grid") or {}
    background_state = state.get("background") or {}
    if "renderer" in state:  # a whole renderer's state dict
        rs = state["renderer"]
        field_state = {k[6:]: v for k, v in rs.items() if k.startswith("field.")}
        grid_state = {k[5:]: v for k, v in rs.items() if k.startswith("grid.")}
        background_state = {k[11:]: v for k, v in rs.items() if k.startswith("background.")}
    grid_res = int(round(grid_state["occupancy"].numel() ** (1 / 3))) if "occupancy" in grid_state else 64
    background = "mlp" if any(k.startswith("mlp.") for k in background_state) or not background_state else "fixed"
    renderer = build_renderer(list(aabb), cfg(FieldConfig, "field"), cfg(RenderConfig, "render"),
                              background=background, grid_resolution=grid_res)
    renderer.field.load_state_dict(field_state)
    if grid_state:
        renderer.grid.load_state_dict(grid_state, strict=False)
    if background_state:
        renderer.background.load_state_dict(background_state, strict=False)
    return renderer.to(device), {"kind": "checkpoint", "path": str(path), "step": state.get("step"),
                                 "checkpoint_kind": state.get("kind")}


# ---------------------------------------------------------------------------------------------- timing
def render_step(renderer, cameras, shading: str):
    out = renderer.render(cameras, shading=shading)
    loss = out.rgb.mean() + 0.1 * out.opacity.mean()
    loss.backward()
    return out


def run(args) -> Dict:
    started = time.perf_counter()
    device = common.resolve_device(args.device)
    dev = common.device_type(device)
    quick = bool(args.quick)
    if args.resolutions:
        resolutions = [int(r) for r in str(args.resolutions).split(",") if r.strip()]
    elif quick:
        resolutions = [8, 16]
    else:
        resolutions = [64, 128, 256, 512] if dev == "cuda" else [64, 128]
    ref_max = args.reference_max_resolution
    if ref_max is None:
        ref_max = 10**9 if (dev == "cuda" or quick) else 64
    repeats = common.repeats_for(args, full=10 if dev == "cuda" else 3, quick=2)
    warmup = common.warmup_for(args, full=2 if dev == "cuda" else 1, quick=1)

    status = common.available_backends(device)
    wanted = [b for b in str(args.backends).split(",") if b in BACKENDS]
    t_build = time.perf_counter()
    if args.checkpoint:
        renderer, field_info = checkpoint_renderer(args.checkpoint, device)
    else:
        renderer, field_info = synthetic_renderer(device, seed=args.seed, log2_hashmap_size=(14 if quick else 19),
                                                  grid_resolution=(32 if quick else 64))
    field_info["build_seconds"] = time.perf_counter() - t_build
    field_info["occupied_fraction"] = renderer.grid.occupied_fraction()
    renderer.train()
    params = [p for p in renderer.parameters() if p.requires_grad]

    from fastdream.cameras import sample_cameras

    results: List[Dict] = []
    notes: List[str] = []
    for res in resolutions:
        gen = torch.Generator().manual_seed(args.seed + res)
        cameras = sample_cameras(args.batch, res, res, scene_radius=renderer.field.scene_radius, generator=gen, device=device)
        n_rays = args.batch * res * res
        for backend in wanted:
            if backend == "torch" and res > ref_max:
                results.append(common.result_entry("render_fwd_bwd", backend, res, "pixels (side)",
                                                   skipped=f"reference not run above {ref_max} px on {dev} "
                                                           "(bounds the suite; --reference-max-resolution)"))
                continue
            if status.get(backend) is not None:
                results.append(common.result_entry("render_fwd_bwd", backend, res, "pixels (side)",
                                                   skipped=f"backend unavailable: {status[backend]}"))
                continue
            with common.backend_env(backend):
                try:
                    def zero():
                        for p in params:
                            p.grad = None
                    out = render_step(renderer, cameras, args.shading)
                    n_samples = int(out.n_samples)
                    # bigger images on the slow reference: keep the suite bounded
                    reps = repeats if (dev == "cuda" or backend != "torch" or args.repeats) else max(1, repeats - 1)
                    timing = common.time_fn(lambda: render_step(renderer, cameras, args.shading), device=device,
                                            warmup=max(0, warmup - 1), repeats=reps, setup=zero)
                except Exception as exc:
                    results.append(common.result_entry("render_fwd_bwd", backend, res, "pixels (side)",
                                                       skipped=f"{type(exc).__name__}: {exc}"[:300]))
                    continue
            results.append(common.result_entry(
                "render_fwd_bwd", backend, res, "pixels (side)", timing, work=n_rays, work_unit="rays",
                n_rays=n_rays, n_samples=n_samples, samples_per_ray=n_samples / n_rays,
                batch=args.batch, shading=args.shading))

    ratios, targets = [], []
    for res in resolutions:
        ratios.append(common.ratio(f"render {res}x{res} fwd+bwd: native vs reference", results, "render_fwd_bwd",
                                   "native", "torch", size=res))
    r64 = next((q["value"] for q in ratios if q["size"] == 64), None)
    targets.append(common.target("cpu_render64_native_vs_reference",
                                 "CPU: native >= 3x the PyTorch reference on a full 64x64 render fwd+bwd",
                                 r64, 3.0, ">=", applies=(dev == "cpu"), unit="x"))
    config = {"resolutions": resolutions, "batch": args.batch, "shading": args.shading, "repeats": repeats,
              "warmup": warmup, "backends": wanted, "reference_max_resolution": ref_max, "backend_status": status, "field": field_info,
              "render": {k: getattr(renderer.config, k) for k in ("samples_per_ray", "early_stop_eps", "alpha_threshold")},
              "seed": args.seed}
    if quick:
        notes.append("quick mode: tiny hash table (2^14), 32^3 occupancy grid, 8/16 px; numbers are for testing only")
    return common.make_result("render", args, config, results, ratios, targets, started, notes)


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.finish(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
