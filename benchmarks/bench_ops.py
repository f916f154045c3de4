"""Op-level benchmark: hash encoding, marching, pruning and compositing, per backend and batch size.

    python -m benchmarks.bench_ops [--device cpu|cuda] [--quick] [--json OUT] [--sizes 14,16,18]
                                   [--reference-max-log2 N] [--backends native,reference,tinycudann,nerfacc]

Backends: native (fastdream._C through fastdream.ops._native), reference (the PyTorch ops in
fastdream.ops.*_reference), and the peers when importable: tinycudann's HashGrid (same grid config,
CUDA only) and nerfacc's OccGridEstimator sampling + volume rendering (same grid and step).
Measurements (median and spread over repeats after warm-up; CUDA events on the GPU):
  hash_fwd, hash_fwd_bwd      N points (2^14 .. 2^22 in full mode), 16 levels x 2 features, 2^19 table,
                              float32 params; fwd_bwd = forward + backward into the params
  march                       R rays through a 128^3 occupancy grid holding a sphere shell
  composite_fwd, composite_fwd_bwd   the packed samples of `march`, lambertian shading, grads to
                              sigmas/albedo/normals
  prune                       the pruning pass (compact_visible_samples) on the samples of `march` with
                              densities up to 200 (most rays end inside the shell): early ray termination at
                              T < 1e-4 and compaction into a buffer of the marched size
  cameras_rays                the training step's camera pass: 4 orbit cameras from their random draws
                              (orbit_cameras) and the rays and per-ray lights of their R pixels (camera_rays)
  frequency_encode            the background's encoding of the R ray directions of `march` (4 frequencies)
Target: CPU native >= 5x reference on hash_fwd_bwd.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402

from . import common  # noqa: E402

HASH_CFG = dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16)
GRID_RES = 128
ALL_BACKENDS = ("native", "reference", "tinycudann", "nerfacc")


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma-separated log2 point counts for the hash encoding "
                                                  "(default 14,16,18,20,22; quick: 10)")
    p.add_argument("--ray-sizes", default=None, help="comma-separated log2 ray counts for marching/compositing "
                                                      "(default 12,14,16 on the CPU, 14,16,18 on CUDA; quick: 8)")
    p.add_argument("--reference-max-log2", type=int, default=None,
                   help="largest log2 size the slow PyTorch reference runs (default: 18 on the CPU, all on CUDA)")
    p.add_argument("--backends", default=",".join(ALL_BACKENDS), help="comma-separated subset of " + ",".join(ALL_BACKENDS))
    return p


def _sizes(text, default):
    return [int(s) for s in text.split(",")] if text else list(default)


def _scene(device, n_rays, seed=0):
    """Rays from a sphere of radius 3 towards the unit box; a sphere-shell occupancy grid."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.nn.functional.normalize(torch.randn(n_rays, 3, generator=g), dim=-1) * 3.0
    target = (torch.rand(n_rays, 3, generator=g) * 2 - 1) * 0.6
    directions = torch.nn.functional.normalize(target - eye, dim=-1)
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    r = (torch.arange(GRID_RES) + 0.5) / GRID_RES * 2 - 1
    xx, yy, zz = torch.meshgrid(r, r, r, indexing="ij")
    rad = (xx ** 2 + yy ** 2 + zz ** 2).sqrt()
    binary = (rad > 0.45) & (rad < 0.6)
    return eye.to(device), directions.to(device), aabb.to(device), binary.to(device)


def _camera_draws(device, n_cameras=4):
    """orbit_cameras' inputs as sample_cameras draws them (default ranges, 64 px focal range)."""
    g = torch.Generator().manual_seed(2)
    camera_u, light_noise, light_u = (torch.rand(4, n_cameras, generator=g), torch.randn(n_cameras, 3, generator=g),
                                      torch.rand(3, n_cameras, generator=g))
    lo_hi = torch.tensor([(-10.0, 90.0), (0.0, 360.0), (1.0, 1.5), (45.0, 86.0), (0.8, 1.5), (0.7, 1.0), (0.1, 0.4)])
    return [t.to(device) for t in (camera_u, light_u, light_noise, lo_hi[:, :1], lo_hi[:, 1:] - lo_hi[:, :1])]


def _march_kwargs():
    return dict(near=0.0, far=1e10, step_size=2 * math.sqrt(3) / 1024, cone_angle=0.0, max_step_size=1e10)


def run(args) -> Dict[str, Any]:
    started = time.perf_counter()
    device = common.resolve_device(getattr(args, "device", None))
    dev = common.device_type(device)
    quick = bool(getattr(args, "quick", False))
    wanted = [b.strip() for b in (getattr(args, "backends", None) or ",".join(ALL_BACKENDS)).split(",") if b.strip()]
    point_sizes = _sizes(getattr(args, "sizes", None), [10] if quick else [14, 16, 18, 20, 22])
    ray_sizes = _sizes(getattr(args, "ray_sizes", None), [8] if quick else ([12, 14, 16] if dev == "cpu" else [14, 16, 18]))
    ref_max = getattr(args, "reference_max_log2", None)
    if ref_max is None:
        ref_max = 18 if dev == "cpu" else 99
    repeats = common.repeats_for(args, full=7 if dev == "cpu" else 20)
    warmup = common.warmup_for(args, full=1 if dev == "cpu" else 3)

    from fastdream.ops import hash_grid_layout
    from fastdream.ops.compositing import composite_reference
    from fastdream.ops.hash_encoding import hash_encode_reference
    from fastdream.ops.marching import march_rays_reference
    from fastdream.ops.cameras import camera_rays_reference, orbit_cameras_reference
    from fastdream.ops.frequency_encoding import frequency_encode_reference
    from fastdream.ops.pruning import compact_visible_samples_reference

    status = common.available_backends(device)
    skip: Dict[str, str] = {}
    impls: Dict[str, Dict[str, Any]] = {}
    if "reference" in wanted:
        impls["reference"] = dict(hash=hash_encode_reference, march=march_rays_reference, composite=composite_reference,
                                  prune=compact_visible_samples_reference, orbit=orbit_cameras_reference,
                                  rays=camera_rays_reference, encode=frequency_encode_reference)
    if "native" in wanted:
        if status["native"] is None:
            from fastdream.ops import _native
            impls["native"] = dict(hash=_native.hash_encode, march=_native.march_rays, composite=_native.composite,
                                   prune=_native.compact_visible_samples, orbit=_native.orbit_cameras,
                                   rays=_native.camera_rays, encode=_native.frequency_encode)
        else:
            skip["native"] = status["native"]
    tcnn = None
    if "tinycudann" in wanted:
        if dev != "cuda":
            skip["tinycudann"] = "CUDA only"
        elif importlib.util.find_spec("tinycudann") is None:
            skip["tinycudann"] = "not installed"
        else:
            import tinycudann as tcnn  # noqa: F811
    nerfacc = None
    if "nerfacc" in wanted:
        if importlib.util.find_spec("nerfacc") is None:
            skip["nerfacc"] = "not installed"
        else:
            import nerfacc  # noqa: F811

    layout = hash_grid_layout(**HASH_CFG)
    results: List[Dict[str, Any]] = []
    timing_kw = dict(device=device, warmup=warmup, repeats=repeats)

    # ---------------------------------------------------------------- hash encoding
    params = (torch.randn(layout.n_params, generator=torch.Generator().manual_seed(0)) * 1e-2).to(device)
    tcnn_enc = None
    if tcnn is not None:
        pls = (2048 / 16) ** (1 / 15)
        tcnn_enc = tcnn.Encoding(3, {"otype": "HashGrid", "n_levels": 16, "n_features_per_level": 2,
                                     "log2_hashmap_size": 19, "base_resolution": 16, "per_level_scale": pls},
                                 dtype=torch.float32).to(device)
    for k in point_sizes:
        n = 2 ** k
        x = torch.rand(n, 3, device=device, generator=None)
        for name, impl in list(impls.items()) + ([("tinycudann", None)] if tcnn_enc is not None else []):
            if name == "reference" and k > ref_max:
                for metric in ("hash_fwd", "hash_fwd_bwd"):
                    results.append(common.result_entry(metric, name, n, "points", skipped=f"reference capped at 2^{ref_max}"))
                continue
            p = params.clone().requires_grad_()
            if name == "tinycudann":
                fwd = lambda: tcnn_enc(x)  # noqa: E731
                enc_params = tcnn_enc.params
            else:
                fwd = (lambda f=impl["hash"], pp=p: f(x, pp, layout))
                enc_params = p
            with torch.no_grad():
                t = common.time_fn(fwd, **timing_kw)
            results.append(common.result_entry("hash_fwd", name, n, "points", t, work=n, work_unit="points"))
            grad_out = torch.ones(n, layout.n_params and 32, device=device)

            def fwd_bwd(fwd=fwd, enc_params=enc_params):
                enc_params.grad = None
                fwd().backward(grad_out)
            t = common.time_fn(fwd_bwd, **timing_kw)
            results.append(common.result_entry("hash_fwd_bwd", name, n, "points", t, work=n, work_unit="points"))

    # ---------------------------------------------------------------- marching + compositing
    mk = _march_kwargs()
    for k in ray_sizes:
        n_rays = 2 ** k
        o, d, aabb, binary = _scene(device, n_rays)
        for name, impl in impls.items():
            if name == "reference" and k > ref_max:
                for metric in ("march", "composite_fwd", "composite_fwd_bwd", "prune"):
                    results.append(common.result_entry(metric, name, n_rays, "rays", skipped=f"reference capped at 2^{ref_max}"))
                continue
            march = lambda f=impl["march"]: f(o, d, aabb, binary, **mk)  # noqa: E731
            t = common.time_fn(march, **timing_kw)
            ri, ts, te = march()
            n_samples = int(ri.numel())
            results.append(common.result_entry("march", name, n_rays, "rays", t, work=n_rays, work_unit="rays",
                                               samples=n_samples))
            g = torch.Generator().manual_seed(1)
            sig = (torch.rand(n_samples, generator=g) * 20).to(device)
            alb = torch.rand(n_samples, 3, generator=g).to(device)
            nrm = torch.nn.functional.normalize(torch.randn(n_samples, 3, generator=g), dim=-1).to(device)
            lights = (torch.randn(n_rays, 3, generator=g) * 3).to(device)
            li = torch.ones(n_rays, device=device)
            amb = torch.full((n_rays,), 0.1, device=device)

            def comp(f=impl["composite"], s=sig, a=alb, nn_=nrm):
                return f(ts, te, ri, n_rays, s, a, nn_, o, d, lights, li, amb, "lambertian")
            with torch.no_grad():
                t = common.time_fn(comp, **timing_kw)
            results.append(common.result_entry("composite_fwd", name, n_rays, "rays", t, work=n_samples,
                                               work_unit="samples", samples=n_samples))
            s_, a_, n_ = sig.clone().requires_grad_(), alb.clone().requires_grad_(), nrm.clone().requires_grad_()

            def comp_fb(f=comp, s_=s_, a_=a_, n_=n_):
                s_.grad = a_.grad = n_.grad = None
                rgb, op, depth, normal, _ = f(s=s_, a=a_, nn_=n_)
                (rgb.sum() + op.sum() + normal.sum()).backward()
            t = common.time_fn(comp_fb, **timing_kw)
            results.append(common.result_entry("composite_fwd_bwd", name, n_rays, "rays", t, work=n_samples,
                                               work_unit="samples", samples=n_samples))
            dense, n_valid = sig * 10, torch.tensor(n_samples, device=device)

            def prune(f=impl["prune"], dense=dense, n_valid=n_valid):
                return f(ri, ts, te, dense, n_valid, n_rays, 1e-4, 0.0, n_samples)
            t = common.time_fn(prune, **timing_kw)
            results.append(common.result_entry("prune", name, n_rays, "rays", t, work=n_samples, work_unit="samples",
                                               samples=n_samples, kept=int(prune()[3])))
            side = 2 ** ((k - 2) // 2)  # 4 cameras of side x side pixels: 2^k rays for even k
            draws = _camera_draws(device)

            def cameras_rays(orbit=impl["orbit"], rays=impl["rays"], side=side):
                c2w, fx, fy, cx, cy, _, _, _, light, intensity, ambient = orbit(*draws, side, side, 1.0, False)
                return rays(c2w, fx, fy, cx, cy, light, intensity, ambient, side, side)
            with torch.no_grad():
                t = common.time_fn(cameras_rays, **timing_kw)
            results.append(common.result_entry("cameras_rays", name, n_rays, "rays", t, work=4 * side * side,
                                               work_unit="rays"))
            with torch.no_grad():
                t = common.time_fn(lambda f=impl["encode"]: f(d, 4), **timing_kw)
            results.append(common.result_entry("frequency_encode", name, n_rays, "rays", t, work=n_rays,
                                               work_unit="rays"))
        if nerfacc is not None:
            results.extend(_nerfacc_rows(nerfacc, device, o, d, aabb, binary, mk, n_rays, timing_kw))
    for name, why in skip.items():
        results.append(common.result_entry("all", name, skipped=why))

    # ---------------------------------------------------------------- ratios / targets
    ratios = []
    for metric, unit_sizes in (("hash_fwd", point_sizes), ("hash_fwd_bwd", point_sizes), ("march", ray_sizes),
                               ("composite_fwd", ray_sizes), ("composite_fwd_bwd", ray_sizes), ("prune", ray_sizes),
                               ("cameras_rays", ray_sizes), ("frequency_encode", ray_sizes)):
        common_sizes = [2 ** k for k in unit_sizes if k <= ref_max]
        if common_sizes:
            ratios.append(common.ratio(f"{metric}_native_vs_reference", results, metric, "native", "reference",
                                       size=common_sizes[-1]))
        if tcnn_enc is not None and metric.startswith("hash"):
            ratios.append(common.ratio(f"{metric}_native_vs_tinycudann", results, metric, "native", "tinycudann",
                                       size=2 ** unit_sizes[-1]))
    hash_ratio = next((r["value"] for r in ratios if r["name"] == "hash_fwd_bwd_native_vs_reference"), None)
    targets = [common.target("cpu_hash_fwd_bwd_5x", "CPU native hash encoding fwd+bwd >= 5x the PyTorch reference",
                             hash_ratio, 5.0, applies=(dev == "cpu"))]
    if tcnn_enc is not None:
        tr = next((r["value"] for r in ratios if r["name"] == "hash_fwd_bwd_native_vs_tinycudann"), None)
        targets.append(common.target("gpu_hash_vs_tcnn", "CUDA hash encoding fwd+bwd at least as fast as tiny-cuda-nn",
                                     tr, 1.0, applies=(dev == "cuda")))
    config = {"hash": dict(HASH_CFG, per_level_scale="default (16 -> 2048)", params_dtype="float32"),
              "point_sizes_log2": point_sizes, "ray_sizes_log2": ray_sizes, "grid_resolution": GRID_RES,
              "march": mk, "shading": "lambertian", "reference_max_log2": ref_max, "repeats": repeats,
              "warmup": warmup, "backends": wanted, "skipped_backends": skip, "torch_threads": torch.get_num_threads()}
    return common.make_result("ops", args, config, results, ratios=ratios, targets=targets, started=started)


def _nerfacc_rows(nerfacc, device, o, d, aabb, binary, mk, n_rays, timing_kw):
    """nerfacc's OccGridEstimator sampling + rendering on the same grid (best effort across versions)."""
    rows = []
    try:
        est = nerfacc.OccGridEstimator(roi_aabb=aabb.tolist(), resolution=GRID_RES, levels=1).to(device)
        est.binaries.copy_(binary.reshape(est.binaries.shape))

        def march():
            return est.sampling(o, d, near_plane=mk["near"], far_plane=mk["far"], render_step_size=mk["step_size"],
                                cone_angle=mk["cone_angle"])
        t = common.time_fn(march, **timing_kw)
        ri, ts, te = march()
        rows.append(common.result_entry("march", "nerfacc", n_rays, "rays", t, work=n_rays, work_unit="rays",
                                        samples=int(ri.numel())))
        sig = torch.rand(ri.numel(), device=device, requires_grad=True) * 20
        rgbs = torch.rand(ri.numel(), 3, device=device, requires_grad=True)

        def render():
            return nerfacc.rendering(ts, te, ri, n_rays=n_rays, rgb_sigma_fn=lambda a, b, c: (rgbs, sig))
        with torch.no_grad():
            t = common.time_fn(render, **timing_kw)
        rows.append(common.result_entry("composite_fwd", "nerfacc", n_rays, "rays", t, work=int(ri.numel()),
                                        work_unit="samples"))
    except Exception as exc:  # pragma: no cover - depends on the installed nerfacc
        rows.append(common.result_entry("march", "nerfacc", n_rays, "rays", skipped=f"{type(exc).__name__}: {exc}"[:200]))
    return rows


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.finish(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
