"""The mesh stage after the NeRF stage (`fastdream run --stages nerf,mesh`): every output of a tiny Stable
Diffusion run, `fastdream export` of a finished two-stage run, exact resume on both sides of the stage
boundary, and the mesh stage after an image-conditioned NeRF stage. The reconstruction proof (the refined
mesh beats the NeRF stage's on the demo scene) is the last test here; benchmarks/bench_mesh_stage.py reports
the same on a second scene."""
import json
import os

import numpy as np
import pytest
import torch

from fastdream import train
from fastdream.checkpoint import latest_checkpoint, load_checkpoint
from fastdream.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_run import _count_frames, _ref_args, _sets, scene_path  # noqa: E402,F401

MESH_TINY = ["stages=nerf,mesh", "mesh.resolution=32", "mesh.tet_resolution=16", "output.texture_resolution=64"]
MESH_FILES = ("mesh.obj", "mesh.mtl", "mesh.ply", "mesh.glb")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_stable_diffusion_two_stage_run_writes_every_output(tmp_path, capsys):
    tiny = pytest.importorskip("tests.tiny_models")
    pytest.importorskip("diffusers")
    pytest.importorskip("xatlas")
    import trimesh

    model = tiny.make_tiny_sd_pipeline(tmp_path / "tiny-sd")
    out = tmp_path / "hamburger"
    args = ["run", "a hamburger", "--model", str(model), "--steps", "4", "--stages", "nerf,mesh", "--out", str(out),
            "--device", "cpu", "--quiet"] + _sets(*MESH_TINY, "mesh.steps=3", "output.video_frames=4",
                                                  "guidance.options.latent_mode=vae")
    assert main(args) == 0, capsys.readouterr().err
    # the refined mesh, textured, replaces the NeRF's; the NeRF stage's outputs are kept under coarse/
    for folder in (out, out / "coarse"):
        for name in ("mesh.obj", "mesh.ply", "mesh.glb"):
            mesh = trimesh.load(folder / name, force="mesh")
            assert len(mesh.faces) > 0 and np.all(np.abs(mesh.bounds) <= 1.01), folder / name
        assert _count_frames(folder / "turntable.mp4") == 4 and _count_frames(folder / "turntable_textureless.mp4") == 4
    assert "map_Kd mesh_albedo.png" in (out / "mesh.mtl").read_text() and (out / "mesh_albedo.png").exists()
    assert not (out / "coarse" / "mesh_albedo.png").exists()  # output.texture is off: the coarse mesh has vertex colours
    refined = trimesh.load(out / "mesh.obj", force="mesh")
    coarse = trimesh.load(out / "coarse" / "mesh.obj", force="mesh")
    assert refined.vertices.shape != coarse.vertices.shape or not np.allclose(refined.vertices, coarse.vertices)
    # one step count across the stages; the stage is named in every row and checkpoint
    rows = _rows(out)
    assert [r["stage"] for r in rows] == ["nerf"] * 4 + ["mesh"] * 3
    assert all(np.isfinite(r["loss_sds"]) and r["loss_normal_consistency"] >= 0 for r in rows[4:])
    state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert state["stage"] == "mesh" and state["step"] == 7
    assert load_checkpoint(out / "checkpoints" / "step_0000004.pt")["stage"] == "nerf"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 7 and metrics["n_skipped"] == 0
    assert metrics["outputs"]["obj"] == "mesh.obj" and metrics["outputs"]["coarse_obj"] == os.path.join("coarse", "mesh.obj")

    # `fastdream export` of the finished run rebuilds both from the mesh stage's checkpoint
    before = (out / "mesh.obj").read_text()
    for name in MESH_FILES:
        (out / name).unlink()
    (out / "coarse" / "mesh.obj").unlink()
    assert main(["export", str(out), "--no-video"]) == 0
    assert (out / "mesh.obj").read_text() == before
    assert (out / "coarse" / "mesh.obj").exists()


def _assert_same_final_state(a, b):
    sa, sb = load_checkpoint(latest_checkpoint(a / "checkpoints")), load_checkpoint(latest_checkpoint(b / "checkpoints"))
    assert sa["step"] == sb["step"] and sa["stage"] == sb["stage"] == "mesh"
    for part in ("mesh_model", "coarse_renderer"):
        for key, value in sa[part].items():
            assert torch.equal(value, sb[part][key]), (part, key)
    for k, state in sa["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["optimizer"]["state"][k][name])), (k, name)
    assert torch.equal(sa["rng"]["generator"], sb["rng"]["generator"])


def test_a_run_killed_in_either_stage_resumes_to_the_uninterrupted_result(tmp_path, scene_path, monkeypatch):  # noqa: F811
    sets = [*MESH_TINY, "mesh.steps=4", "output.mesh=false", "output.video=false", "shading.albedo_only_fraction=0.25"]
    assert main(_ref_args(scene_path, tmp_path / "whole", 4, *sets)) == 0
    for kill_at in (2, 6):  # in the NeRF stage, then in the mesh stage
        out = tmp_path / f"killed_{kill_at}"

        def interrupt(trainer, step):
            if step == kill_at:
                raise KeyboardInterrupt

        monkeypatch.setattr(train, "_on_step", interrupt)
        assert main(_ref_args(scene_path, out, 4, *sets)) == 130
        assert load_checkpoint(latest_checkpoint(out / "checkpoints"))["stage"] == ("nerf" if kill_at < 4 else "mesh")
        monkeypatch.setattr(train, "_on_step", lambda trainer, step: None)
        assert main(_ref_args(scene_path, out, 4, *sets, extra=["--resume"])) == 0
        _assert_same_final_state(tmp_path / "whole", out)


def test_a_finished_nerf_run_is_refined_with_resume(tmp_path, scene_path):  # noqa: F811
    sets = ["output.mesh=false", "output.video=false"]
    out = tmp_path / "run"
    assert main(_ref_args(scene_path, out, 4, *sets)) == 0
    assert main(_ref_args(scene_path, out, 4, *sets, *MESH_TINY, "mesh.steps=2", extra=["--resume"])) == 0
    assert [r["stage"] for r in _rows(out)] == ["nerf"] * 4 + ["mesh"] * 2


def test_the_mesh_stage_keeps_the_input_view_of_an_image_run(tmp_path, capsys):
    pytest.importorskip("diffusers")
    import imageio.v3 as iio

    from tests.tiny_models import make_tiny_zero123_pipeline
    from test_image_run import IMAGE_TINY

    img = np.zeros((48, 64, 4), np.uint8)
    img[10:40, 36:58] = (220, 120, 30, 255)
    photo = tmp_path / "box.png"
    iio.imwrite(photo, img)
    model = make_tiny_zero123_pipeline(tmp_path / "tiny-zero123")
    out = tmp_path / "box"
    args = ["run", "--image", str(photo), "--model", str(model), "--steps", "3", "--out", str(out), "--device", "cpu",
            "--quiet"] + _sets(*IMAGE_TINY, *MESH_TINY, "mesh.steps=2", "output.mesh=false")
    assert main(args) == 0, capsys.readouterr().err
    rows = _rows(out)
    assert [r["stage"] for r in rows] == ["nerf"] * 3 + ["mesh"] * 2
    # the photo's reconstruction terms, from the mesh rendered at the input camera, are in the mesh stage's loss
    assert all(r["loss_input_rgb"] > 0 and r["loss_input_mask"] > 0 for r in rows[3:])
    state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert state["stage"] == "mesh" and "input_photo" in state
    # the turntables of both stages show the photo at the left of every frame
    for folder in (out, out / "coarse"):
        assert next(iter(iio.imiter(folder / "turntable.mp4"))).shape[:2] == (32, 64)


# The proof's run: the draft NeRF stage, then a short mesh stage at 64 px on a 48^3 grid.
PROOF_NERF_STEPS, PROOF_MESH_STEPS = 150, 400
PROOF_SETS = ["mesh.resolution=64", "mesh.tet_resolution=48", "output.mesh_resolution=64", "output.video=false",
              "output.preview_every=0", "output.checkpoint_every=0", "output.texture_resolution=128"]


def test_the_refined_mesh_beats_the_nerf_stage_on_the_demo_scene(tmp_path):
    """Reference guidance drives both stages; the refined mesh beats the NeRF stage's result (coarse/) in both
    occupancy IoU and held-out PSNR. The demo scene is made opaque (peak density 300 instead
    of 60): at 60 its density ramp renders as a semi-transparent rim whose alpha = 0.5 outline, the one a
    surface can match, lies outside the density > 10 occupancy the IoU counts."""
    import time

    from fastdream.demo import demo_scene
    from benchmarks.bench_recipe import reconstruction_scores

    scene = demo_scene(32, peak_density=300.0)
    np.savez(tmp_path / "scene.npz", **scene)
    out = tmp_path / "run"
    args = ["run", "the demo scene", "--out", str(out), "--steps", str(PROOF_NERF_STEPS), "--device", "cpu",
            "--quiet", "--guidance", "reference", "--reference-scene", str(tmp_path / "scene.npz"), "--preset", "draft",
            "--stages", "nerf,mesh", "--set", f"mesh.steps={PROOF_MESH_STEPS}"]
    for item in PROOF_SETS:
        args += ["--set", item]
    t0 = time.perf_counter()
    assert main(args) == 0
    wall = time.perf_counter() - t0
    coarse_iou, coarse_psnr = reconstruction_scores(out, scene, coarse=True)
    iou, view_psnr = reconstruction_scores(out, scene)
    rows = _rows(out)
    nerf_s = max(r["time"] for r in rows if r["stage"] == "nerf")
    print(f"\nmesh stage on the demo scene: IoU {coarse_iou:.3f} -> {iou:.3f}, held-out PSNR {coarse_psnr:.2f} -> "
          f"{view_psnr:.2f} dB ({PROOF_NERF_STEPS} NeRF steps in {nerf_s:.0f}s, {PROOF_MESH_STEPS} mesh steps in "
          f"{rows[-1]['time'] - nerf_s:.0f}s, {wall:.0f}s in all)")
    # measured here: IoU 0.414 -> 0.545, PSNR 14.03 -> 14.39 dB. The mesh first loses colour (the NeRF's albedo
    # queried at the surface: 12.2 dB after one mesh step) and wins it back as the colour field trains on the surface
    assert iou > coarse_iou + 0.05, (coarse_iou, iou, coarse_psnr, view_psnr)
    assert view_psnr > coarse_psnr, (coarse_psnr, view_psnr)


def test_mesh_stage_step_benchmark_quick_cpu(tmp_path):
    """bench_mesh_stage times one mesh-stage step with the tiny UNet and its JSON validates."""
    pytest.importorskip("diffusers")
    from benchmarks import bench_mesh_stage, common

    out = tmp_path / "mesh_stage_cpu.json"
    bench_mesh_stage.main(["--device", "cpu", "--quick", "--no-refine", "--repeats", "1", "--warmup", "0",
                           "--json", str(out)])
    data = json.loads(out.read_text())
    assert common.validate(data) == []
    (step,) = data["results"]
    assert step["median_ms"] > 0 and step["extra"]["faces"] > 0 and step["extra"]["tet_resolution"] == 16
