"""Mesh-stage geometry benchmark: DMTet extraction (marching tetrahedra) and render_mesh, forward + backward.

    python -m benchmarks.bench_mesh [--device cpu|cuda] [--quick] [--json OUT] [--tet-resolutions 32,64]
                                    [--resolution 512] [--batch 1]

Measurements, on a DMTet initialised to a ball (about what the mesh stage extracts every step):
  marching_tets_fwd_bwd  DMTetGeometry.extract() and the backward of a sum of the vertices into sdf and deform;
  render_mesh_fwd_bwd    render_mesh of that surface at --resolution px (lambertian, vertex normals, an albedo
                         function of the position), backward of the image mean into the vertices;
  mesh_step_fwd_bwd      both: extract + render + backward into sdf and deform (one mesh-stage render step
                         without the colour field and the guidance).
Backends: native (fastdream._C rasterization ops) and reference (the PyTorch twins; marching_tets is plain
torch in both). The reference rasterizer tests every pixel against every triangle, so on the CPU it is only
timed up to --reference-max-px pixels (the rows above are marked skipped).
"""
from __future__ import annotations

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
    p.add_argument("--tet-resolutions", default=None, help="comma-separated DMTet grid sizes, cubes per axis "
                   "(default 32,64; quick: 12)")
    p.add_argument("--resolution", type=int, default=None, help="rendered image size in px (default 512; quick: 64)")
    p.add_argument("--batch", type=int, default=1, help="cameras per render (default 1, as the mesh stage)")
    p.add_argument("--reference-max-px", type=int, default=128,
                   help="largest image the PyTorch-twin rasterizer is timed at on the CPU (default 128)")
    return p


def _albedo(points: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(3.0 * points)


def run(args) -> Dict[str, Any]:
    from fastdream import ops
    from fastdream.cameras import orbit_cameras
    from fastdream.dmtet import DMTetGeometry
    from fastdream.mesh_renderer import render_mesh

    started = time.perf_counter()
    device = common.resolve_device(getattr(args, "device", None))
    dev = common.device_type(device)
    quick = bool(getattr(args, "quick", False))
    text = getattr(args, "tet_resolutions", None)
    tet_resolutions = [int(s) for s in text.split(",")] if text else ([12] if quick else [32, 64])
    res = getattr(args, "resolution", None) or (64 if quick else 512)
    batch = max(1, int(getattr(args, "batch", 1) or 1))
    ref_max = int(getattr(args, "reference_max_px", 128) or 128)
    repeats = common.repeats_for(args, full=5 if dev == "cpu" else 20)
    warmup = common.warmup_for(args, full=1 if dev == "cpu" else 3)
    cams = orbit_cameras(batch, res, res, elevation_deg=20.0, distance=2.5, fov_y_deg=45.0).to(device)

    backends: Dict[str, Any] = {"reference": "torch"}
    skip: Dict[str, str] = {}
    status = common.available_backends(device)
    if status["native"] is None:
        backends["native"] = "native"
    else:
        skip["native"] = status["native"]

    results: List[Dict[str, Any]] = []
    for tet_res in tet_resolutions:
        geometry = DMTetGeometry(tet_res).to(device)  # a ball of radius 0.5 in [-1, 1]^3
        with torch.no_grad():
            verts0, faces = geometry.extract()
        sizes = dict(tet_resolution=tet_res, tets=int(geometry.tets.shape[0]), vertices=int(verts0.shape[0]),
                     faces=int(faces.shape[0]))

        def extract_step(geometry=geometry):
            geometry.zero_grad(set_to_none=True)
            verts, _ = geometry.extract()
            verts.sum().backward()

        t = common.time_fn(extract_step, device=device, warmup=warmup, repeats=repeats)
        results.append(common.result_entry("marching_tets_fwd_bwd", "torch", tet_res, "cubes/axis", t,
                                           work=sizes["tets"], work_unit="tets", **sizes))
        for name, backend in backends.items():
            if backend == "torch" and dev == "cpu" and res > ref_max:
                why = f"PyTorch-twin rasterizer timed up to {ref_max} px on the CPU (every pixel x every triangle)"
                for metric in ("render_mesh_fwd_bwd", "mesh_step_fwd_bwd"):
                    results.append(common.result_entry(metric, name, res, "px", skipped=why, **sizes))
                continue

            def render_step(backend=backend, verts0=verts0, faces=faces):
                with common.backend_env(backend):
                    verts = verts0.clone().requires_grad_()
                    out = render_mesh(verts, faces, cams, color_fn=_albedo, shading="lambertian")
                    out.rgb.mean().backward()

            def full_step(backend=backend, geometry=geometry):
                with common.backend_env(backend):
                    geometry.zero_grad(set_to_none=True)
                    verts, faces_ = geometry.extract()
                    out = render_mesh(verts, faces_, cams, color_fn=_albedo, shading="lambertian")
                    (out.rgb.mean() + out.opacity.mean()).backward()

            for metric, fn in (("render_mesh_fwd_bwd", render_step), ("mesh_step_fwd_bwd", full_step)):
                t = common.time_fn(fn, device=device, warmup=warmup, repeats=repeats)
                results.append(common.result_entry(metric, name, res, "px", t, work=batch * res * res,
                                                   work_unit="pixels", **sizes))
    for name, why in skip.items():
        results.append(common.result_entry("all", name, skipped=why))
    ratios = []
    if dev != "cpu" or res <= ref_max:
        ratios.append(common.ratio("mesh_step_native_vs_reference", results, "mesh_step_fwd_bwd", "native",
                                   "reference", size=res))
    config = {"tet_resolutions": tet_resolutions, "resolution": res, "batch": batch, "repeats": repeats,
              "warmup": warmup, "reference_max_px": ref_max, "skipped_backends": skip,
              "torch_threads": torch.get_num_threads(), "ops_backend": ops.backend_name()}
    return common.make_result("mesh", args, config, results, ratios=ratios, started=started)


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.finish(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
