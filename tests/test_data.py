"""The posed-image loader (NeRF-synthetic / instant-ngp format) and its errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastdream.cameras import generate_rays
from fastdream.data import load_dataset, load_transforms
from fastdream.errors import FastDreamError


def test_camera_angle_x(nerf_dataset):
    folder = nerf_dataset(n_frames=3, width=8, height=6, intrinsics="angle")
    data = load_transforms(folder / "transforms.json")
    assert data.images.shape == (3, 6, 8, 3) and data.images.dtype == torch.float32
    assert data.c2w.shape == (3, 4, 4)
    focal = 0.5 * 8 / math.tan(0.4)
    assert torch.allclose(data.fx, torch.full((3,), focal)) and torch.allclose(data.fy, torch.full((3,), focal))
    assert torch.allclose(data.cx, torch.full((3,), 4.0)) and torch.allclose(data.cy, torch.full((3,), 3.0))
    assert data.aabb.tolist() == [-1.5, -1.5, -1.5, 1.5, 1.5, 1.5]  # default box
    cams = data.cameras
    assert len(cams) == 3 and (cams.width, cams.height) == (8, 6)
    assert data.intrinsics.shape == (3, 4)


def test_focal_format_with_size_and_aabb_scale(nerf_dataset):
    # w/h twice the stored image size: the loader rescales the intrinsics to the image on disk
    folder = nerf_dataset(n_frames=2, width=8, height=6, intrinsics="focal", extension=True,
                          extra={"w": 16, "h": 12, "aabb_scale": 4})
    data = load_transforms(folder / "transforms.json")
    assert torch.allclose(data.fx, torch.full((2,), 5.0)) and torch.allclose(data.fy, torch.full((2,), 5.5))
    assert torch.allclose(data.cx, torch.full((2,), 1.75)) and torch.allclose(data.cy, torch.full((2,), 1.25))
    assert data.aabb.tolist() == [-6.0] * 3 + [6.0] * 3


def test_per_frame_intrinsics_and_explicit_aabb(nerf_dataset):
    folder = nerf_dataset(n_frames=2, intrinsics="focal", extra={"aabb": [[-1, -2, -3], [1, 2, 3]]})
    meta = json.loads((folder / "transforms.json").read_text())
    meta["frames"][1]["fl_x"] = 20.0
    (folder / "transforms.json").write_text(json.dumps(meta))
    data = load_transforms(folder / "transforms.json")
    assert data.fx.tolist() == [10.0, 20.0]
    assert data.aabb.tolist() == [-1, -2, -3, 1, 2, 3]


def test_rays_follow_opengl_convention(nerf_dataset):
    """The centre pixel of a camera looks down its -z axis, from its position."""
    folder = nerf_dataset(n_frames=1, width=9, height=7, intrinsics="angle")
    data = load_transforms(folder / "transforms.json")
    origins, dirs = generate_rays(data.cameras)
    centre = dirs[0, 3, 4]
    assert torch.allclose(centre, -data.c2w[0, :3, 2], atol=1e-6)
    assert torch.allclose(origins[0, 0, 0], data.c2w[0, :3, 3])


def test_single_transforms_holds_out_every_8th(nerf_dataset):
    folder = nerf_dataset(n_frames=17, width=4, height=4)
    full = load_transforms(folder / "transforms.json")
    train, test = load_dataset(folder)
    assert len(test) == 3 and len(train) == 14
    assert torch.equal(test.c2w, full.c2w[[0, 8, 16]])
    assert torch.equal(train.images, full.images[[i for i in range(17) if i % 8]])
    assert [p.name for p in test.paths] == ["r_0.png", "r_8.png", "r_16.png"]
    # a transforms.json file path works like its folder
    train2, test2 = load_dataset(folder / "transforms.json")
    assert len(train2) == 14 and len(test2) == 3


def test_train_test_files(nerf_dataset, tmp_path):
    folder = tmp_path / "synthetic"
    nerf_dataset(folder, split="train", n_frames=5, seed=1)
    nerf_dataset(folder, split="test", n_frames=2, seed=2)
    train, test = load_dataset(folder)
    assert len(train) == 5 and len(test) == 2
    assert test.source.name == "transforms_test.json"


def test_rgba_compositing_over_background(tmp_path, nerf_dataset):
    folder = nerf_dataset(n_frames=1, width=2, height=1)
    pixels = np.array([[[255, 0, 0, 255], [255, 0, 0, 0]]], dtype=np.uint8)
    Image.fromarray(pixels, mode="RGBA").save(folder / "images" / "r_0.png")
    white = load_transforms(folder / "transforms.json").images[0, 0]
    assert torch.allclose(white, torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    black = load_transforms(folder / "transforms.json", background=(0.0, 0.0, 0.0)).images[0, 0]
    assert torch.allclose(black, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    half = np.array([[[255, 0, 0, 128], [0, 0, 255, 128]]], dtype=np.uint8)
    Image.fromarray(half, mode="RGBA").save(folder / "images" / "r_0.png")
    mixed = load_transforms(folder / "transforms.json").images[0, 0]
    a = 128 / 255
    assert torch.allclose(mixed, torch.tensor([[1.0, 1 - a, 1 - a], [1 - a, 1 - a, 1.0]]), atol=1e-6)


def test_alpha_is_kept_to_recomposite_over_another_background(nerf_dataset):
    """PosedImages.alphas lets the fit put a composited image over another background (random backgrounds):
    image_white + (1 - alpha) (black - white) is the image composited over black; downscaling averages it."""
    folder = nerf_dataset(n_frames=2, width=8, height=6, rgba=True)
    white, black = load_transforms(folder / "transforms.json"), load_transforms(folder / "transforms.json", background=(0.0, 0.0, 0.0))
    assert white.alphas.shape == (2, 6, 8) and bool(((white.alphas > 0) & (white.alphas < 1)).any())
    assert torch.allclose(white.images - (1.0 - white.alphas)[..., None], black.images, atol=1e-6)
    half = load_transforms(folder / "transforms.json", resolution=4)
    assert torch.allclose(half.alphas, torch.nn.functional.avg_pool2d(white.alphas, 2), atol=1e-6)
    assert torch.equal(white.subset([1]).alphas, white.alphas[1:])


def test_rgb_images_load_without_alpha(nerf_dataset):
    folder = nerf_dataset(n_frames=2, rgba=False)
    data = load_transforms(folder / "transforms.json")
    assert data.images.shape == (2, 6, 8, 3) and data.alphas is None  # opaque: no alpha kept


def test_downscale(nerf_dataset):
    folder = nerf_dataset(n_frames=2, width=8, height=6, intrinsics="focal")
    # a 2x2-block image: downscaling by 2 must average each block exactly
    blocks = np.random.default_rng(0).integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    Image.fromarray(np.kron(blocks, np.ones((2, 2, 1), dtype=np.uint8)), mode="RGB").save(folder / "images" / "r_0.png")
    full = load_transforms(folder / "transforms.json")
    half = load_transforms(folder / "transforms.json", resolution=4)
    assert half.images.shape == (2, 3, 4, 3) and (half.width, half.height) == (4, 3)
    assert torch.allclose(half.images[0], torch.from_numpy(blocks).float() / 255, atol=1e-5)
    assert torch.allclose(half.fx, full.fx / 2) and torch.allclose(half.cy, full.cy / 2)
    same = load_transforms(folder / "transforms.json", resolution=8)
    assert torch.equal(same.images, full.images)
    with pytest.raises(FastDreamError, match="only be downscaled"):
        load_transforms(folder / "transforms.json", resolution=16)


# ---------------------------------------------------------------- bad input


def _edit(folder, change):
    path = folder / "transforms.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    return path


def test_missing_dataset(tmp_path):
    with pytest.raises(FastDreamError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastDreamError, match="neither transforms.json nor transforms_train.json") as info:
        load_dataset(tmp_path / "empty")
    assert "empty" in str(info.value)


def test_malformed_json(nerf_dataset):
    folder = nerf_dataset(n_frames=2)
    (folder / "transforms.json").write_text('{"frames": [ {"file_path": ')
    with pytest.raises(FastDreamError, match="not valid JSON") as info:
        load_dataset(folder)
    assert "transforms.json" in str(info.value)
    (folder / "transforms.json").write_text("[1, 2]")
    with pytest.raises(FastDreamError, match="JSON object"):
        load_dataset(folder)


def test_missing_image(nerf_dataset):
    folder = nerf_dataset(n_frames=3)
    (folder / "images" / "r_1.png").unlink()
    with pytest.raises(FastDreamError, match="frame 1") as info:
        load_dataset(folder)
    assert "r_1" in str(info.value) and "does not exist" in str(info.value)


def test_unreadable_image(nerf_dataset):
    folder = nerf_dataset(n_frames=2)
    (folder / "images" / "r_0.png").write_bytes(b"not a png")
    with pytest.raises(FastDreamError, match="could not be read") as info:
        load_dataset(folder)
    assert "r_0.png" in str(info.value)


@pytest.mark.parametrize("matrix, problem", [
    ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], "shape"),
    ([1, 2, 3], "shape"),
    ("identity", "4x4"),
    ([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, float("nan")], [0, 0, 0, 1]], "non-finite"),
    ([[0, 0, 0, 0]] * 4, "singular"),
])
def test_wrong_transform(nerf_dataset, matrix, problem):
    folder = nerf_dataset(n_frames=2)
    path = _edit(folder, lambda m: m["frames"][1].__setitem__("transform_matrix", matrix))
    with pytest.raises(FastDreamError, match=problem) as info:
        load_dataset(folder)
    assert str(path) in str(info.value) and "frame 1" in str(info.value)


def test_3x4_transform_accepted(nerf_dataset):
    folder = nerf_dataset(n_frames=2)
    _edit(folder, lambda m: m["frames"][0].__setitem__("transform_matrix", m["frames"][0]["transform_matrix"][:3]))
    data = load_transforms(folder / "transforms.json")
    assert data.c2w[0, 3].tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("change, problem", [
    (lambda m: m.__setitem__("frames", []), "empty"),
    (lambda m: m.pop("frames"), "no \"frames\""),
    (lambda m: m.pop("camera_angle_x"), "intrinsics"),
    (lambda m: m.__setitem__("camera_angle_x", "wide"), "camera_angle_x"),
    (lambda m: m["frames"][0].pop("transform_matrix"), "transform_matrix"),
    (lambda m: m["frames"][0].pop("file_path"), "file_path"),
    (lambda m: m.__setitem__("aabb_scale", -1), "aabb_scale"),
])
def test_bad_fields(nerf_dataset, change, problem):
    folder = nerf_dataset(n_frames=2)
    path = _edit(folder, change)
    with pytest.raises(FastDreamError, match=problem) as info:
        load_dataset(folder)
    assert str(path) in str(info.value)


def test_single_frame_cannot_hold_out(nerf_dataset):
    folder = nerf_dataset(n_frames=1)
    with pytest.raises(FastDreamError, match="at least 2"):
        load_dataset(folder)


def test_mixed_image_sizes(nerf_dataset):
    folder = nerf_dataset(n_frames=2, width=8, height=6)
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(folder / "images" / "r_1.png")
    with pytest.raises(FastDreamError, match="same size"):
        load_dataset(folder)


def test_lens_distortion_is_removed(tmp_path, caplog):
    """An image taken through an OpenCV k1/k2/p1/p2 lens (instant-ngp's fox has one) loads as the pinhole image."""
    from PIL import Image

    w, h, fx, fy, cx, cy = 64, 48, 50.0, 52.0, 31.0, 25.0
    lens = {"k1": -0.2, "k2": 0.05, "p1": 0.01, "p2": -0.005}
    pattern = lambda u, v: 0.5 + 0.4 * np.sin(8.0 * u) * np.cos(6.0 * v)  # noqa: E731  (in pinhole coordinates)
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    ud, vd = (xs - cx) / fx, (ys - cy) / fy
    u, v = ud.copy(), vd.copy()
    for _ in range(50):  # invert the distortion by fixed-point iteration (an independent route to the same model)
        r2 = u * u + v * v
        radial = 1 + lens["k1"] * r2 + lens["k2"] * r2 * r2
        du = 2 * lens["p1"] * u * v + lens["p2"] * (r2 + 2 * u * u)
        dv = lens["p1"] * (r2 + 2 * v * v) + 2 * lens["p2"] * u * v
        u, v = (ud - du) / radial, (vd - dv) / radial
    taken = pattern(u, v)
    (tmp_path / "images").mkdir()
    Image.fromarray((np.repeat(taken[..., None], 3, -1) * 255 + 0.5).astype(np.uint8)).save(tmp_path / "images" / "a.png")
    meta = {"fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": w, "h": h,
            "frames": [{"file_path": "images/a.png", "transform_matrix": np.eye(4).tolist(), **lens}]}
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with caplog.at_level("INFO", logger="fastdream"):
        data = load_transforms(tmp_path / "transforms.json")
    assert "undistorted 1 image" in caplog.text
    pinhole = pattern((xs - cx) / fx, (ys - cy) / fy)
    inner = (slice(6, -6), slice(6, -6))
    err = np.abs(data.images[0, ..., 0].numpy() - pinhole)[inner]
    assert err.mean() < 0.003 and err.max() < 0.015, (err.mean(), err.max())
    assert np.abs(taken - pinhole)[inner].mean() > 5 * err.mean()  # the lens mattered
    # fisheye lenses are not modelled: said, not silently ignored
    meta["is_fisheye"] = True
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="fastdream"):
        load_transforms(tmp_path / "transforms.json")
    assert "fisheye" in caplog.text
