"""The mesh stage: the time of one training step, and the refinement proof on a scene the tests do not use.

    python -m benchmarks.bench_mesh_stage [--device cpu|cuda] [--quick] [--json OUT]
                                          [--resolution 512] [--tet-resolution 128] [--no-refine]
                                          [--nerf-steps 400] [--mesh-steps 200]

``mesh_stage_step``: one `Trainer.train_step` of the mesh stage (marching tetrahedra on the DMTet grid,
rasterization at ``--resolution``, colour field at the covered pixels, SDS from Stable Diffusion with the
tiny test UNet/VAE, normal consistency, backward, Adam), the stage started from an untrained NeRF
stage (its density blob). Only the diffusion model is tiny: the geometry and the renders are the
default sizes (512 px, 128^3 cells) unless --quick.

``refine``: `fastdream run --guidance reference --stages nerf,mesh` on a second reference scene (a
coloured torus beside a box, voxelised from a mesh: a hole and flat faces, neither in the demo scene the
tests use), then the NeRF stage's exported mesh (coarse/) and the refined one are scored as the tests
score the demo scene (`tests/test_reference_guidance.reconstruction_scores`: occupancy IoU against the
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


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=None, help="mesh-stage render size (default 512; quick 64)")
    p.add_argument("--tet-resolution", type=int, default=None, help="tetrahedral grid cells per axis (default 128; quick 16)")
    p.add_argument("--no-refine", action="store_true", help="skip the refinement proof on the second scene")
    p.add_argument("--nerf-steps", type=int, default=400, help="refine: NeRF stage steps (quick 20)")
    p.add_argument("--mesh-steps", type=int, default=200, help="refine: mesh stage steps (quick 5)")
    return p


def second_scene(path: Path) -> Path:
    """A torus (orange to purple around its ring) beside a green box, as a PLY mesh for the reference guidance."""
    import trimesh

    torus = trimesh.creation.torus(major_radius=0.4, minor_radius=0.15, major_sections=48, minor_sections=24)
    torus.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2.5, [1, 0, 0]))
    torus.apply_translation([-0.2, 0.1, 0.0])
    angle = np.arctan2(torus.vertices[:, 2], torus.vertices[:, 0] + 0.2)
    mix = (np.cos(angle)[:, None] + 1) / 2
    torus.visual.vertex_colors = np.concatenate(
        [(mix * [240, 140, 30] + (1 - mix) * [120, 40, 200]).round(), np.full((len(mix), 1), 255)], 1).astype(np.uint8)
    box = trimesh.creation.box(extents=(0.35, 0.5, 0.35))
    box.apply_translation([0.5, -0.2, 0.1])
    box.visual.vertex_colors = np.tile([40, 180, 90, 255], (len(box.vertices), 1)).astype(np.uint8)
    trimesh.util.concatenate([torus, box]).export(path)
    return path


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
    sys.path.insert(0, str(common.REPO_ROOT / "tests"))
    from test_reference_guidance import reconstruction_scores

    from fastdream.guidance.reference import load_reference_scene
    from fastdream.runs import run

    with tempfile.TemporaryDirectory() as tmp:
        path = second_scene(Path(tmp) / "torus_and_box.ply")
        scene = load_reference_scene(path, resolution=32)
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
    return {"scene": "torus and box (mesh, voxelised at 32^3)", "nerf_steps": nerf_steps, "mesh_steps": mesh_steps,
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
