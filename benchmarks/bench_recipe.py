"""Does the default recipe converge? `fastdream run --preset draft` against known scenes, scored.

    python -m benchmarks.bench_recipe [--device cpu|cuda] [--quick] [--json OUT] [--steps N]
                                      [--scenes demo,torus] [--set KEY=VALUE ...]

Each scene is reconstructed by ``fastdream run --guidance reference --preset draft`` (the exact denoiser of
the scene in place of a diffusion model; every recipe default except the draft preset's smaller field and
32x32 renders), then scored by ``reconstruction_scores``: the IoU of the exported mesh's occupancy with the
scene's, and the PSNR of albedo renders from six held-out cameras. Scenes:

  demo        ``fastdream.demo.demo_scene``: two spheres and a box (the scene the test suite checks against)
  torus       a tilted torus beside a box, off-centre, with a thin ring: a scene the test suite does not tune
              against, as compact as the demo scene (nothing beyond 0.8 scene radii from the centre)
  torus_wide  the same scene 4/3 as large, reaching 1.08 scene radii from the centre: past the initial
              density blob (0.5 R), where the blob's negative bias holds density down, and past the nearest
              training cameras (1 R), which see part of it from inside or not at all

What a text-to-3D recipe assumes about the object (it grows from the blob at the centre and is framed by
cameras 1-1.5 scene radii away) holds for the first two; ``torus_wide`` shows what happens when it does not.

Reported per scene: IoU, held-out PSNR, steps and wall time (the whole run, export included). --quick runs
20 steps on the demo scene only (plumbing, not a convergence figure).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from . import common  # noqa: E402

#: Steps of a scored reconstruction (the test suite's and this benchmark's default).
RECON_STEPS = 400
#: Output knobs of a scored run: they change what is written at the end, not training.
OUTPUT_SETS = [
    "output.mesh_resolution=64", "output.video_frames=4", "output.video_resolution=64", "output.preview_every=0",
    "output.checkpoint_every=0",
]
SCENES = ("demo", "torus", "torus_wide")


def torus_scene(resolution: int = 32, scale: float = 0.75, peak_density: float = 60.0) -> Dict[str, np.ndarray]:
    """A torus (major radius 0.45, minor 0.12) tilted 30 degrees about x, centred off the origin, beside a
    box, all scaled by ``scale`` about the origin; voxel arrays as ``fastdream.demo.demo_scene`` returns them
    (soft surfaces 1.5 voxels wide)."""
    import torch

    D = int(resolution)
    coords = (torch.arange(D, dtype=torch.float32) + 0.5) / D * 2.0 - 1.0
    p = torch.stack(torch.meshgrid(coords, coords, coords, indexing="ij"), dim=-1) / float(scale)
    c, s = np.cos(np.radians(30.0)), np.sin(np.radians(30.0))
    q = p - torch.tensor([-0.2, 0.1, 0.05])
    q = torch.stack([q[..., 0], c * q[..., 1] - s * q[..., 2], s * q[..., 1] + c * q[..., 2]], dim=-1)
    ring = torch.linalg.vector_norm(q[..., [0, 2]], dim=-1) - 0.45
    torus = torch.sqrt(ring ** 2 + q[..., 1] ** 2) - 0.12
    b = (p - torch.tensor([0.5, -0.45, -0.3])).abs() - torch.tensor([0.18, 0.25, 0.18])
    box = torch.linalg.vector_norm(b.clamp_min(0.0), dim=-1) + b.max(dim=-1).values.clamp_max(0.0)
    sdf, which = torch.stack([torus, box]).min(dim=0)
    y = p[..., 1]
    colours = torch.stack([
        torch.stack([0.9 + 0.0 * y, 0.75 + 0.2 * y.clamp(-0.5, 0.5), 0.2 + 0.0 * y], dim=-1),  # yellow ring
        torch.stack([0.6 + 0.0 * y, 0.2 + 0.0 * y, 0.7 + 0.2 * y.clamp(-0.5, 0.5)], dim=-1),   # purple box
    ]).clamp(0.0, 1.0)
    albedo = torch.gather(colours, 0, which[None, ..., None].expand(1, D, D, D, 3))[0]
    density = peak_density * (0.5 - scale * sdf / (1.5 * 2.0 / D)).clamp(0.0, 1.0)
    return {"density": density.numpy().astype(np.float32), "albedo": albedo.numpy().astype(np.float32),
            "aabb": np.asarray((-1.0, -1.0, -1.0, 1.0, 1.0, 1.0), dtype=np.float32)}


def scene_by_name(name: str, resolution: int = 32) -> Dict[str, np.ndarray]:
    from fastdream.demo import demo_scene

    if name == "demo":
        return demo_scene(resolution)
    if name == "torus":
        return torus_scene(resolution)
    if name == "torus_wide":
        return torus_scene(resolution, scale=1.0)
    raise SystemExit(f"unknown scene {name!r}; choose among {', '.join(SCENES)}")


def reconstruction_scores(out, scene, coarse: bool = False) -> Tuple[float, float]:
    """(mesh IoU, held-out PSNR) of the run in `out` against the reference `scene`: occupancy of the exported
    mesh vs the scene's (density above the export threshold) on a 48^3 lattice, and albedo renders from six
    held-out cameras (an elevation/azimuth/distance/focal never sampled exactly in training). `coarse`: the
    NeRF stage's result of a run that refined it into a mesh (coarse/mesh.obj and the NeRF renderer)."""
    import torch
    import trimesh

    from fastdream.cameras import orbit_cameras
    from fastdream.export import psnr
    from fastdream.guidance.reference import ReferenceSceneGuidance, VoxelField, mesh_occupancy
    from fastdream.runs import load_run  # the run's renderer is rebuilt from its newest checkpoint

    out = Path(out)
    D = 48
    aabb = scene["aabb"]
    pitch = float(aabb[3] - aabb[0]) / D
    c = [aabb[i] + (np.arange(D) + 0.5) * pitch for i in range(3)]
    points = np.stack(np.meshgrid(*c, indexing="ij"), -1).reshape(-1, 3)
    predicted = mesh_occupancy(trimesh.load(out / ("coarse" if coarse else "") / "mesh.obj", force="mesh"), points,
                               pitch / 2)
    truth = VoxelField(scene["density"], scene["albedo"], aabb).density(torch.as_tensor(points, dtype=torch.float32)).numpy() > 10.0
    iou = float((predicted & truth).sum() / (predicted | truth).sum())

    loaded = load_run(out, device="cpu")
    renderer = loaded.stage.coarse if coarse else loaded.stage.renderer
    reference = ReferenceSceneGuidance(scene, "cpu", render_config=loaded.config.render, grid_resolution=32)
    cams = orbit_cameras(6, 48, 48, elevation_deg=25.0, distance=2.1, fov_y_deg=50.0, start_azimuth_deg=17.0)
    with torch.no_grad():
        pred = renderer.render(cams, "albedo").rgb
    return iou, float(psnr(pred, reference.reference_images(cams, "albedo").permute(0, 2, 3, 1)))


def reconstruct(scene: Dict[str, np.ndarray], folder: Path, steps: int, device: str = "cpu",
                overrides: List[str] = ()) -> Dict:
    """Run the default recipe with --preset draft on `scene` (reference guidance) in `folder`; scores and times."""
    from fastdream.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    scene_path = folder / "scene.npz"
    np.savez(scene_path, **scene)
    out = folder / "run"
    argv = ["run", "the reference scene", "--out", str(out), "--steps", str(steps), "--device", device, "--quiet",
            "--guidance", "reference", "--reference-scene", str(scene_path), "--preset", "draft"]
    for item in list(OUTPUT_SETS) + list(overrides):
        argv += ["--set", item]
    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"fastdream run exited with {rc}")
    iou, view_psnr = reconstruction_scores(out, scene)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"iou": iou, "psnr_db": view_psnr, "steps": steps, "wall_time_s": wall,
            "train_time_s": metrics.get("train_time_s"), "it_per_s": metrics.get("it_per_s")}


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help=f"steps per scene (default {RECON_STEPS}; quick: 20)")
    p.add_argument("--scenes", default=None, help=f"comma-separated among {','.join(SCENES)} (default all; quick: demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides for the runs")
    return p


def run(args) -> Dict:
    started = time.perf_counter()
    device = common.resolve_device(args.device)
    steps = args.steps or (20 if args.quick else RECON_STEPS)
    scenes = [s for s in (args.scenes or ("demo" if args.quick else ",".join(SCENES))).split(",") if s]
    results, notes = [], []
    with tempfile.TemporaryDirectory(prefix="fastdream-bench-recipe-") as tmp:
        for name in scenes:
            r = reconstruct(scene_by_name(name), Path(tmp) / name, steps, device, list(args.set or []))
            print(f"{name}: IoU {r['iou']:.3f}, held-out PSNR {r['psnr_db']:.2f} dB, {steps} steps, "
                  f"{r['wall_time_s']:.1f} s", flush=True)
            results.append(common.result_entry(f"reconstruct_{name}", common.environment(device)["backend"]["active"] or "auto",
                                               steps, "steps", common.summarize([1e3 * r["wall_time_s"]]), scene=name, **r))
    config = {"steps": steps, "scenes": scenes, "preset": "draft", "guidance": "reference",
              "overrides": list(OUTPUT_SETS) + list(args.set or []), "scene_resolution": 32}
    if args.quick:
        notes.append("quick mode: 20 steps on the demo scene: a plumbing test, not a convergence figure")
    notes += loaded_machine_note()
    return common.make_result("recipe", args, config, results, [], [], started, notes)


def loaded_machine_note() -> List[str]:
    """The scores do not depend on the machine's load (fixed seeds), the wall times do: say so when it was busy."""
    import os

    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cpus:
        return []
    return [f"the machine was shared (load average {load:.1f} on {cpus} CPUs): the wall times are inflated; "
            "the scores do not depend on it"]


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.finish(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
