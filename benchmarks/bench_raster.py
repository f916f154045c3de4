"""Differentiable rasterization benchmark: rasterize + interpolate + antialias, forward + backward.

    python -m benchmarks.bench_raster [--device cpu|cuda] [--quick] [--json OUT] [--resolutions 128,256,512]
                                      [--subdivisions 3]

One measurement = rasterize a sphere mesh (an icosphere, as a DMTet surface of that size) seen by one
perspective camera, interpolate per-vertex colours, antialias, then backward of a weighted sum into the
vertex positions and colours. Backends: native (fastdream._C), reference (the PyTorch twins in
fastdream.ops.rasterization; it tests every pixel against every triangle, so it is capped on the CPU), and
nvdiffrast when importable (CUDA only; the same three calls). Target: CPU native >= 5x the reference at 512 px.
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


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--resolutions", default=None, help="comma-separated image sizes (default 128,256,512; quick: 64)")
    p.add_argument("--subdivisions", type=int, default=None,
                   help="icosphere subdivisions (default 3: 1280 triangles; quick: 2)")
    return p


def icosphere(subdivisions: int):
    """Unit icosphere: vertices (V, 3) float32, triangles (F, 3) int64."""
    t = (1 + math.sqrt(5)) / 2
    v = torch.tensor([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
                      [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], dtype=torch.float64)
    f = torch.tensor([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
                      [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5],
                      [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    for _ in range(subdivisions):
        edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).sort(1).values
        uniq, inv = torch.unique(edges, dim=0, return_inverse=True)
        mid = v.shape[0] + inv.view(3, -1).T  # (F, 3): midpoints of edges 01, 12, 20
        v = torch.cat([v, (v[uniq[:, 0]] + v[uniq[:, 1]]) / 2])
        a, b, c = f.unbind(1)
        m01, m12, m20 = mid.unbind(1)
        f = torch.cat([torch.stack(x, 1) for x in ((a, m01, m20), (b, m12, m01), (c, m20, m12), (m01, m12, m20))])
    v = torch.nn.functional.normalize(v, dim=1)
    return v.float(), f


def clip_positions(verts: torch.Tensor) -> torch.Tensor:
    """(1, V, 4) clip coordinates of the sphere seen from distance 3 with a 40 degree field of view."""
    f = 1 / math.tan(math.radians(20))
    z = verts[:, 2] - 3.0  # camera at +3 looking down -z
    near, far = 0.1, 10.0
    clip = torch.stack([f * verts[:, 0], f * verts[:, 1], (far + near) / (near - far) * z + 2 * far * near / (near - far),
                        -z], 1)
    return clip[None]


def run(args) -> Dict[str, Any]:
    started = time.perf_counter()
    device = common.resolve_device(getattr(args, "device", None))
    dev = common.device_type(device)
    quick = bool(getattr(args, "quick", False))
    text = getattr(args, "resolutions", None)
    resolutions = [int(s) for s in text.split(",")] if text else ([64] if quick else [128, 256, 512])
    subdiv = getattr(args, "subdivisions", None)
    subdiv = (2 if quick else 3) if subdiv is None else subdiv
    repeats = common.repeats_for(args, full=5 if dev == "cpu" else 20)
    warmup = common.warmup_for(args, full=1 if dev == "cpu" else 3)

    from fastdream.ops import rasterization as ref

    verts, tri = icosphere(subdiv)
    pos0 = clip_positions(verts).to(device)
    tri = tri.to(device)
    colours = (verts * 0.5 + 0.5).to(device)
    impls: Dict[str, Any] = {"reference": (ref.rasterize_reference, ref.interpolate_reference, ref.antialias_reference)}
    skip: Dict[str, str] = {}
    status = common.available_backends(device)
    if status["native"] is None:
        from fastdream.ops import _native
        impls["native"] = (_native.rasterize, _native.interpolate, _native.antialias)
    else:
        skip["native"] = status["native"]
    if dev != "cuda":
        skip["nvdiffrast"] = "CUDA only"
    elif importlib.util.find_spec("nvdiffrast") is None:
        skip["nvdiffrast"] = "not installed"
    else:
        import nvdiffrast.torch as dr
        ctx = dr.RasterizeCudaContext(device=device)
        tri32 = tri.int()

        def nv_rasterize(pos, _tri, h, w):
            rast, _ = dr.rasterize(ctx, pos, tri32, resolution=[h, w])
            return rast, None, None

        impls["nvdiffrast"] = (nv_rasterize, lambda a, rast, _b, _t: dr.interpolate(a[None], rast, tri32)[0],
                               lambda c, rast, _d, pos, _t: dr.antialias(c, rast, pos, tri32))

    results: List[Dict[str, Any]] = []
    for res in resolutions:
        for name, (rasterize, interpolate, antialias) in impls.items():
            def step(rasterize=rasterize, interpolate=interpolate, antialias=antialias, res=res):
                pos = pos0.clone().requires_grad_()
                col = colours.clone().requires_grad_()
                tri_id, bary, depth = rasterize(pos, tri, res, res)
                img = antialias(interpolate(col, tri_id, bary, tri), tri_id, depth, pos, tri)
                img.sum().backward()
                return pos.grad
            t = common.time_fn(step, device=device, warmup=warmup, repeats=repeats)
            with torch.no_grad():
                covered = float((impls["reference"][0](pos0, tri, 32, 32)[0] >= 0).float().mean())
            results.append(common.result_entry("raster_fwd_bwd", name, res, "px", t, work=res * res,
                                               work_unit="pixels", triangles=int(tri.shape[0]),
                                               coverage_32px=covered))
    for name, why in skip.items():
        results.append(common.result_entry("all", name, skipped=why))
    ratios = [common.ratio("raster_fwd_bwd_native_vs_reference", results, "raster_fwd_bwd", "native", "reference",
                           size=resolutions[-1])]
    targets = [common.target("cpu_raster_5x", "CPU native rasterize + interpolate + antialias fwd+bwd >= 5x the "
                             "PyTorch twin at the largest resolution", ratios[0]["value"], 5.0,
                             applies=(dev == "cpu"))]
    if "nvdiffrast" in impls:
        ratios.append(common.ratio("raster_fwd_bwd_native_vs_nvdiffrast", results, "raster_fwd_bwd", "native",
                                   "nvdiffrast", size=resolutions[-1]))
    config = {"resolutions": resolutions, "icosphere_subdivisions": subdiv, "triangles": int(tri.shape[0]),
              "repeats": repeats, "warmup": warmup, "skipped_backends": skip, "torch_threads": torch.get_num_threads()}
    return common.make_result("raster", args, config, results, ratios=ratios, targets=targets, started=started)


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.finish(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
