"""The mesh stage: the time of one training step, and the refinement proof on a scene the tests do not use.

    python -m benchmarks.bench_mesh_stage [--device cpu|cuda] [--quick] [--json OUT]
                                          [--resolution 512] [--tet-resolution 128] [--no-refine]
                                          [--nerf-steps 150] [--mesh-steps 150]

``mesh_stage_step``: one `Trainer.train_step` of the mesh stage (marching tetrahedra on the DMTet grid,
rasterization at ``--resolution``, colour field at the covered pixels, SDS from Stable Diffusion with the
tiny test UNet/VAE, normal consistency, backward, Adam), the stage started from an untrained NeRF
stage (its density blob). Only the diffusion model is tiny: the geometry and the renders are the
default sizes (512 px, 128^3 cells) unless --quick.

``refine``: `fastdream run --guidance reference --stages nerf,mesh` on a second reference scene (a
coloured torus beside a box: a hole and flat faces, neither in the demo scene the tests use), then the NeRF stage's exported mesh (coarse/) and the refined one are scored as the tests
score the demo scene (`benchmarks.bench_recipe.reconstruction_scores`: occupancy IoU against the
scene on a 48^3 lattice, albedo PSNR from six held-out cameras), with the CPU time of each stage.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import common  # noqa: E402

# The reference run's settings: the draft preset for the NeRF stage (as the demo-scene proof in the tests)
# and a mesh stage at 64 px on a 48^3 grid, small enough for a CPU.
OUTPUT_SETS = ["output.mesh_resolution=64", "output.video=false", "output.preview_every=0",
               "output.checkpoint_every=0", "output.texture_resolution=256"]
MESH_SETS = ["mesh.resolution=64", "mesh.tet_resolution=48"]
# Opaque objects, as the tests' reference for the mesh stage: with the demo scene's default peak of 60 the
# ramp renders a semi-transparent rim, whose alpha = 0.5 outline (what a surface fits) lies outside the
# density > 10 occupancy the scores count.
PEAK_DENSITY = 300.0


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=None, help="mesh-stage render size (default 512; quick 64)")
    p.add_argument("--tet-resolution", type=int, default=None, help="tetrahedral grid cells per axis (default 128; quick 16)")
    p.add_argument("--no-refine", action="store_true", help="skip the refinement proof on the second scene")
    p.add_argument("--nerf-steps", type=int, default=150, help="refine: NeRF stage steps (quick 20)")
    p.add_argument("--mesh-steps", type=int, default=150, help="refine: mesh stage steps (quick 5)")
    return p


def second_scene(resolution: int = 32, peak_density: float = PEAK_DENSITY) -> Dict[str, np.ndarray]:
    """A tilted torus (orange to purple around its ring) beside a green box, as voxel arrays built like
    `demo.demo_scene` (density ramped over 1.5 voxels across the surface), opaque (see PEAK_DENSITY)."""
    D = int(resolution)
    c = (np.arange(D) + 0.5) / D * 2 - 1
    p = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
    tilt = np.radians(60.0)
    q = p - [-0.25, 0.1, 0.0]
    y = q[..., 1] * np.cos(tilt) - q[..., 2] * np.sin(tilt)
    z = q[..., 1] * np.sin(tilt) + q[..., 2] * np.cos(tilt)
    ring = np.sqrt(q[..., 0] ** 2 + z ** 2)
    torus = np.sqrt((ring - 0.4) ** 2 + y ** 2) - 0.15
    d = np.abs(p - [0.5, -0.25, 0.1]) - [0.18, 0.25, 0.18]
    box = np.linalg.norm(np.maximum(d, 0), axis=-1) + np.minimum(d.max(-1), 0)
    sdf = np.minimum(torus, box)
    mix = ((np.cos(np.arctan2(z, q[..., 0])) + 1) / 2)[..., None]
    albedo = np.where((torus < box)[..., None], mix * [0.95, 0.55, 0.1] + (1 - mix) * [0.45, 0.15, 0.8],
                      [0.15, 0.7, 0.35])
    density = peak_density * np.clip(0.5 - sdf / (1.5 * 2.0 / D), 0.0, 1.0)
    return {"density": density.astype(np.float32), "albedo": albedo.astype(np.float32),
            "aabb": np.array([-1, -1, -1, 1, 1, 1], np.float32)}


def _tiny_sd(folder: Path) -> Path:
    sys.path.insert(0, str(common.REPO_ROOT / "tests"))
    import tiny_models

    return tiny_models.make_tiny_sd_pipeline(folder)


def time_step(device: str, resolution: int, tet_resolution: int, args) -> Dict:
    from fastdream.config import build_config
    from fastdream.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        model = _tiny_sd(Path(tmp) / "tiny-sd")
        config = build_config(overrides=[
            "prompt=a hamburger", f"guidance.model={model}", "stages=nerf,mesh", "steps=1", f"device={device}",
            f"mesh.resolution={resolution}", f"mesh.tet_resolution={tet_resolution}", "output.preview_views=1",
            f"output.mesh_resolution={64 if args.quick else 256}",  # the level set the DMTet starts from
            "output.preview_resolution=16"])
        trainer = Trainer(config, Path(tmp) / "run", quiet=True, device=torch.device(device))
        trainer.step = trainer.stage_end  # the NeRF stage as initialised: its density blob is the shape
        t0 = time.perf_counter()
        trainer.next_stage()
        switch_s = time.perf_counter() - t0
        faces = int(trainer.stage.model.geometry.extract()[1].shape[0])
        timing = common.time_fn(lambda: trainer.train_step(trainer.step), device,
                                warmup=common.warmup_for(args, full=1, quick=1),
                                repeats=common.repeats_for(args, full=5, quick=2))
    return common.result_entry("mesh_stage_step", "tiny-unet", size=resolution, size_unit="px", timing=timing,
                               tet_resolution=tet_resolution, faces=faces, stage_switch_s=round(switch_s, 3))


def refine(device: str, nerf_steps: int, mesh_steps: int) -> Dict:
    from .bench_recipe import reconstruction_scores

    from fastdream.runs import run

    with tempfile.TemporaryDirectory() as tmp:
        scene = second_scene(32)
        path = Path(tmp) / "torus_and_box.npz"
        np.savez(path, **scene)
        out = Path(tmp) / "run"
        result = run("a torus and a box", out, overrides=[*OUTPUT_SETS, *MESH_SETS, f"mesh.steps={mesh_steps}"],
                     quiet=True, preset="draft",
                     cli=dict(steps=nerf_steps, device=device, guidance="reference", reference_scene=str(path),
                              stages="nerf,mesh"))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        nerf_time = max(r["time"] for r in rows if r["stage"] == "nerf")
        mesh_time = max(r["time"] for r in rows) - nerf_time
        coarse_iou, coarse_psnr = reconstruction_scores(out, scene, coarse=True)
        iou, view_psnr = reconstruction_scores(out, scene)
    return {"scene": f"torus and box (32^3 voxels, peak density {PEAK_DENSITY:g})", "nerf_steps": nerf_steps, "mesh_steps": mesh_steps,
            "nerf_stage_cpu_s" if device == "cpu" else "nerf_stage_s": round(nerf_time, 1),
            "mesh_stage_cpu_s" if device == "cpu" else "mesh_stage_s": round(mesh_time, 1),
            "nerf_mesh_iou": round(coarse_iou, 4), "refined_mesh_iou": round(iou, 4),
            "nerf_psnr_db": round(coarse_psnr, 2), "refined_psnr_db": round(view_psnr, 2),
            "wall_s": round(result["wall_time_s"], 1)}


def run_benchmark(args) -> Dict:
    started = time.perf_counter()
    device = common.resolve_device(getattr(args, "device", None))
    quick = bool(getattr(args, "quick", False))
    resolution = args.resolution or (64 if quick else 512)
    tets = args.tet_resolution or (16 if quick else 128)
    results: List[Dict] = [time_step(device, resolution, tets, args)]
    print(f"  mesh_stage_step {resolution} px, {tets}^3 cells: {results[-1]['median_ms']} ms", flush=True)
    targets, config = [], {"resolution": resolution, "tet_resolution": tets, "guidance": "tiny test UNet/VAE"}
    if not args.no_refine:
        nerf_steps, mesh_steps = (20, 5) if quick else (args.nerf_steps, args.mesh_steps)
        proof = refine(device, nerf_steps, mesh_steps)
        print(f"  refine: {proof}", flush=True)
        config["refine"] = proof
        applies = not quick
        targets += [common.target("refined_iou_beats_nerf", "refined mesh IoU minus the NeRF stage's mesh IoU",
                                  proof["refined_mesh_iou"] - proof["nerf_mesh_iou"], 0.0, op=">=", applies=applies),
                    common.target("refined_psnr_beats_nerf", "refined held-out PSNR minus the NeRF stage's, dB",
                                  proof["refined_psnr_db"] - proof["nerf_psnr_db"], 0.0, op=">=", applies=applies,
                                  unit="dB")]
    return common.make_result("mesh_stage", args, config, results, targets=targets, started=started)


run = run_benchmark


def main(argv=None):
    args = build_parser().parse_args(argv)
    return common.finish(run_benchmark(args), args)


if __name__ == "__main__":
    main()
