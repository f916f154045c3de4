"""`fastdream fit`: the engine fitted to posed images must reproduce held-out views."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastdream import fit as fit_module
from fastdream.cameras import generate_rays
from fastdream.checkpoint import load_checkpoint
from fastdream.cli import main
from fastdream.data import load_transforms
from fastdream.demo import demo_scene, load_scene_npz, render_voxels
from fastdream.field import FieldConfig, HashGridField


def test_demo_fit_reaches_25db(demo_fit_run):
    """The whole `fastdream fit --demo` path: synthetic scene -> NeRF folder -> loader -> fit -> held-out PSNR."""
    code, out = demo_fit_run
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["psnr"] >= 25.0, metrics
    assert metrics["steps"] == 150 and metrics["seconds"] > 0
    assert metrics["n_train"] == 32 and metrics["n_test"] == 8 and metrics["resolution"] == [48, 48]
    assert metrics["backend"] in ("torch", "native") and metrics["device"] == "cpu"
    # the demo data is a real NeRF-synthetic folder
    assert (out / "demo_data" / "transforms_train.json").is_file()
    assert len(list((out / "demo_data" / "test").glob("*.png"))) == 8
    # the checkpoint loads and holds a field that renders like the reported PSNR says
    state = load_checkpoint(out / metrics["checkpoint"], kind="fit")
    field = HashGridField(state["aabb"], FieldConfig(**state["field_config"]))
    field.load_state_dict(state["field"])
    assert state["step"] == 150
    assert len(list((out / "test_views").glob("*.png"))) == 8


def test_existing_out_refused_without_force(nerf_dataset, tmp_path, capsys, monkeypatch):
    data = nerf_dataset(n_frames=3, width=6, height=4)
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("earlier run")
    code = main(["fit", str(data), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and str(out) in err and "Traceback" not in err
    assert (out / "old.txt").is_file()
    # with --force the earlier fit outputs are replaced, the user's own files stay, and the (tiny, fast) fit runs
    (out / "test_views").mkdir()
    (out / "test_views" / "view_099.png").write_bytes(b"stale")
    monkeypatch.setattr(fit_module, "default_configs", fit_module.demo_configs)
    code = main(["fit", str(data), "--out", str(out), "--force", "--steps", "2", "--rays", "64", "--no-progress"])
    assert code == 0 and (out / "old.txt").read_text() == "earlier run"
    assert not (out / "test_views" / "view_099.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["n_train"] == 2 and metrics["n_test"] == 1
    assert np.isfinite(metrics["psnr"])
    assert load_checkpoint(out / metrics["checkpoint"], kind="fit")["step"] == 2


def test_resolution_flag_downscales(nerf_dataset, tmp_path, monkeypatch):
    data = nerf_dataset(n_frames=3, width=8, height=6)
    monkeypatch.setattr(fit_module, "default_configs", fit_module.demo_configs)
    out = tmp_path / "run"
    assert main(["fit", str(data), "--out", str(out), "--steps", "1", "--rays", "32", "--resolution", "4", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["resolution"] == [4, 3]


def test_force_never_deletes_the_dataset_or_other_files(nerf_dataset, tmp_path, capsys, monkeypatch):
    """`fit --force` with --out = the dataset, a folder holding it, or the current folder: no user file is lost."""
    data = nerf_dataset(tmp_path / "work" / "data", n_frames=3, width=6, height=4)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    (tmp_path / "work" / "notes.txt").write_text("mine")
    for out in (data, data.parent, tmp_path):
        code = main(["fit", str(data), "--out", str(out), "--force", "--steps", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "holds the input" in err and "Traceback" not in err, err
    monkeypatch.chdir(tmp_path / "work")
    assert main(["fit", str(data), "--out", ".", "--force", "--steps", "1", "--no-progress"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "notes.txt") == before
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine"
    # an --out beside the data: the fit runs there and the files next to it stay
    monkeypatch.setattr(fit_module, "default_configs", fit_module.demo_configs)
    (tmp_path / "work" / "out").mkdir()
    (tmp_path / "work" / "out" / "keep.txt").write_text("keep")
    assert main(["fit", "data", "--out", "out", "--force", "--steps", "1", "--rays", "32", "--no-progress"]) == 0
    assert (tmp_path / "work" / "out" / "keep.txt").read_text() == "keep"
    assert (tmp_path / "work" / "out" / "metrics.json").is_file()


def test_bad_data_with_force_keeps_the_earlier_fit(nerf_dataset, tmp_path, capsys, monkeypatch):
    data = nerf_dataset(n_frames=3, width=6, height=4)
    out = tmp_path / "out"
    monkeypatch.setattr(fit_module, "default_configs", fit_module.demo_configs)
    assert main(["fit", str(data), "--out", str(out), "--steps", "1", "--rays", "32", "--no-progress"]) == 0
    metrics = (out / "metrics.json").read_text()
    assert main(["fit", str(tmp_path / "typo"), "--out", str(out), "--force", "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == metrics


@pytest.mark.parametrize("argv_tail, problem", [
    (["DATA"], "transforms.json"),           # an empty folder
    (["MISSING"], "does not exist"),
    (["--demo", "DATA"], "not both"),
    ([], "DATA_DIR"),
    (["DATA", "--steps", "0"], "--steps"),
    (["DATA", "--rays", "-5"], "--rays"),
    (["DATA", "--resolution", "0"], "--resolution"),
    (["DATA", "--background", "purple"], "--background"),
])
def test_cli_errors_are_clear(tmp_path, capsys, argv_tail, problem):
    (tmp_path / "data").mkdir()
    subst = {"DATA": str(tmp_path / "data"), "MISSING": str(tmp_path / "missing")}
    argv = ["fit"] + [subst.get(a, a) for a in argv_tail] + ["--out", str(tmp_path / "out")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert problem in err and "Traceback" not in err


def test_cli_bad_transforms_names_the_file(nerf_dataset, tmp_path, capsys):
    data = nerf_dataset(n_frames=2)
    (data / "transforms.json").write_text("{not json")
    code = main(["fit", str(data), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "transforms.json" in err and "not valid JSON" in err


def test_pixel_rays_match_generate_rays(nerf_dataset):
    data = load_transforms(nerf_dataset(n_frames=2, width=5, height=4, intrinsics="focal") / "transforms.json")
    origins, dirs = generate_rays(data.cameras)
    j, i = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    idx = torch.ones(20, dtype=torch.long)
    o, d = fit_module.pixel_rays(data, idx, i.reshape(-1).float() + 0.5, j.reshape(-1).float() + 0.5)
    assert torch.allclose(d, dirs[1].reshape(-1, 3), atol=1e-6) and torch.allclose(o, origins[1].reshape(-1, 3))


def test_demo_scene_arrays_and_npz(demo_scene_npz):
    scene = demo_scene(16)
    assert scene["density"].shape == (16, 16, 16) and scene["albedo"].shape == (16, 16, 16, 3)
    assert scene["aabb"].tolist() == [-1, -1, -1, 1, 1, 1]
    assert scene["density"].min() >= 0 and scene["density"].max() > 10 and (scene["density"] == 0).mean() > 0.5
    assert 0 <= scene["albedo"].min() and scene["albedo"].max() <= 1
    loaded = load_scene_npz(demo_scene_npz)
    assert loaded["density"].shape == (32, 32, 32) and loaded["albedo"].shape == (32, 32, 32, 3)
    np.testing.assert_array_equal(loaded["density"], demo_scene(32)["density"])


def test_demo_renderer_basics():
    """Rays that miss the box are transparent; a ray through the scene's centre hits something opaque."""
    scene = demo_scene(16)
    c2w = torch.eye(4)[None].clone()
    c2w[0, :3, 3] = torch.tensor([0.0, 0.0, 3.0])  # looking down -z at the scene
    rgb, alpha = render_voxels(scene, c2w, focal=4.0, width=9, height=9)  # corners miss the box
    assert alpha[0, 4, 4, 0] > 0.99 and alpha[0, 0, 0, 0] < 1e-3
    far = c2w.clone()
    far[0, :3, 3] = torch.tensor([5.0, 0.0, 3.0])
    _, alpha_far = render_voxels(scene, far, focal=40.0, width=9, height=9)
    assert float(alpha_far.max()) == 0.0
