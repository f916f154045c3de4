"""Mesh extraction (world units, orientation, components, colours), mesh files, turntables and previews."""
import numpy as np
import pytest
import torch

from fastdream import export
from fastdream.field import BackgroundModel
from fastdream.guidance.reference import VoxelField
from fastdream.occupancy import OccupancyGrid
from fastdream.renderer import RenderConfig, Renderer


def _sphere_field(centre=(0.3, -0.2, 0.1), radius=0.4, speck=None, D=40):
    c = (np.arange(D) + 0.5) / D * 2 - 1
    p = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
    sdf = np.linalg.norm(p - np.asarray(centre), axis=-1) - radius
    density = 50.0 * np.clip(0.5 - sdf / 0.08, 0, 1)
    if speck is not None:  # a tiny floater far from the sphere
        density += 50.0 * (np.linalg.norm(p - np.asarray(speck), axis=-1) < 0.06)
    albedo = np.zeros((D, D, D, 3))
    albedo[..., 0] = (p[..., 1] > -0.2)  # red top half, blue bottom half
    albedo[..., 2] = (p[..., 1] <= -0.2)
    return VoxelField(density.astype(np.float32), albedo.astype(np.float32), np.array([-1, -1, -1, 1, 1, 1], np.float32))


def test_mesh_is_in_world_units_outward_and_coloured():
    field = _sphere_field()
    mesh = export.extract_mesh(field, resolution=48, threshold=25.0, min_component=0.0)
    centre = np.asarray(mesh.vertices).mean(0)
    np.testing.assert_allclose(centre, [0.3, -0.2, 0.1], atol=0.02)
    r = np.linalg.norm(np.asarray(mesh.vertices) - [0.3, -0.2, 0.1], axis=1)
    assert abs(r.mean() - 0.4) < 0.03
    assert mesh.is_watertight and mesh.volume > 0  # outward normals
    np.testing.assert_allclose(mesh.volume, 4 / 3 * np.pi * 0.4**3, rtol=0.1)
    colors = np.asarray(mesh.visual.vertex_colors)[:, :3]
    v = np.asarray(mesh.vertices)
    top, bottom = v[:, 1] > 0.0, v[:, 1] < -0.4
    assert colors[top, 0].mean() > 200 and colors[top, 2].mean() < 50
    assert colors[bottom, 2].mean() > 200 and colors[bottom, 0].mean() < 50


def test_small_components_are_dropped():
    field = _sphere_field(speck=(-0.7, 0.7, -0.7))
    assert len(export.extract_mesh(field, 48, 25.0, min_component=0.0).split(only_watertight=False)) == 2
    assert len(export.extract_mesh(field, 48, 25.0, min_component=0.2).split(only_watertight=False)) == 1


def test_empty_field_gives_no_mesh(caplog):
    field = VoxelField(np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8, 3), np.float32), [-1, -1, -1, 1, 1, 1])
    assert export.extract_mesh(field, 16, 10.0) is None
    assert "no surface" in caplog.text


def test_mesh_files_load_in_trimesh(tmp_path):
    import trimesh

    mesh = export.extract_mesh(_sphere_field(), 32, 25.0)
    paths = export.write_mesh(mesh, tmp_path)
    assert set(paths) >= {"obj", "mtl", "ply", "glb"}
    obj_text = paths["obj"].read_text()
    assert obj_text.splitlines()[1] == "mtllib mesh.mtl" and "newmtl material0" in paths["mtl"].read_text()
    for kind in ("obj", "ply", "glb"):
        loaded = trimesh.load(paths[kind], force="mesh", process=False)
        assert len(loaded.faces) == len(mesh.faces), kind
        np.testing.assert_allclose(loaded.bounds, mesh.bounds, atol=1e-4, err_msg=kind)
        assert loaded.visual.kind == "vertex", kind
        cols = np.asarray(loaded.visual.vertex_colors)[:, :3]
        assert cols.max() > 200, kind  # vertex colours survived


def _renderer():
    field = _sphere_field()
    grid = OccupancyGrid(field.aabb, resolution=16)
    grid.binary.copy_(field.occupancy(16))
    return Renderer(field, BackgroundModel("fixed", (1.0, 1.0, 1.0)), grid, RenderConfig(samples_per_ray=64))


def _count_frames(path) -> int:
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return sum(1 for _ in reader)
    finally:
        reader.close()


def test_turntable_video_has_the_frames_asked_for(tmp_path):
    r = _renderer()
    frames = export.render_turntable(r, n_frames=5, resolution=34, shading="textureless", batch=2)
    assert frames.shape == (5, 34, 34, 3) and frames.dtype == np.uint8
    assert frames[0, 0, 0].tolist() == [255, 255, 255]  # background
    assert not np.array_equal(frames[0], frames[2])  # the view turns (the sphere is off-centre)
    path = export.write_video(frames, tmp_path / "t.mp4", fps=10)
    assert path.suffix == ".mp4" and _count_frames(path) == 5


def test_gif_fallback_without_ffmpeg(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ffmpeg(name, *args, **kwargs):
        if name == "imageio_ffmpeg":
            raise ImportError("no ffmpeg here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ffmpeg)
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    frames[1] += 100
    path = export.write_video(frames, tmp_path / "t.mp4", fps=10)
    assert path.suffix == ".gif" and path.exists()
    import imageio.v3 as iio

    assert iio.imread(path, index=None).shape[0] == 3


def test_preview_grid(tmp_path):
    import imageio.v2 as imageio

    path = export.write_preview(_renderer(), tmp_path / "previews" / "step_00010.png", n_views=3, resolution=20)
    image = imageio.imread(path)
    assert image.shape == (40, 60, 3)  # colour row over textureless row


def test_export_outputs_follows_the_output_config(tmp_path):
    from fastdream.config import OutputConfig

    o = OutputConfig(mesh_resolution=24, mesh_threshold=25.0, video_frames=2, video_resolution=24)
    written = export.export_outputs(_renderer(), tmp_path, o)
    assert {"obj", "ply", "glb", "video_albedo", "video_textureless"} <= set(written)
    assert _count_frames(written["video_albedo"]) == 2


def test_psnr():
    a = torch.zeros(4, 4, 3)
    assert export.psnr(a, a) == float("inf")
    assert export.psnr(a, a + 0.1) == pytest.approx(20.0)


def test_rasterize_uv_matches_per_texel_inside_test():
    """The vectorised rasteriser keeps exactly the texels whose centre is within `margin` texels of each
    edge line of a triangle and of its bounding box (brute force over every texel), with barycentrics that reproduce the texel position, also
    when the faces are split across chunks."""
    rng = np.random.default_rng(0)
    size = 24
    tris = rng.uniform(-2, size + 1, (40, 3, 2)).astype(np.float32)
    tris[5] = [[1, 1], [5, 5], [9, 9]]  # degenerate: skipped
    tris[6] = [[30, 2], [40, 3], [35, 60]]  # entirely off the texture
    faces, texels, bary = export.rasterize_uv(tris, size, margin=0.5, chunk=97)

    def edge_distance(p, q, r, x, y):  # signed distance of (x, y) from line pq, positive on r's side
        n = np.array([q[1] - p[1], p[0] - q[0]]) / np.hypot(*(q - p))
        return np.sign(n @ (r - p)) * (n @ (np.array([x, y]) - p))

    expected = set()
    for k, (a, b, c) in enumerate(tris.astype(np.float64)):
        if abs((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])) < 1e-12:
            continue
        lo, hi = np.minimum(np.minimum(a, b), c) - 0.5, np.maximum(np.maximum(a, b), c) + 0.5
        for y in range(size):
            for x in range(size):
                if lo[0] <= x <= hi[0] and lo[1] <= y <= hi[1] and min(edge_distance(b, c, a, x, y), edge_distance(c, a, b, x, y), edge_distance(a, b, c, x, y)) >= -0.5:
                    expected.add((k, x, y))
    got = {(int(k), int(x), int(y)) for k, (x, y) in zip(faces, texels)}
    assert got == expected and len(got) == len(faces) > 100
    pos = np.einsum("nk,nkc->nc", bary, tris[faces].astype(np.float64))
    np.testing.assert_allclose(pos, texels, atol=1e-3)


def test_dilate_texture_grows_charts_without_wrapping():
    image = np.zeros((8, 8, 3), np.float32)
    filled = np.zeros((8, 8), bool)
    image[0, 0], filled[0, 0] = (1.0, 0.5, 0.0), True
    out = export.dilate_texture(image, filled, iterations=3)
    grown = np.abs(out).sum(-1) > 0
    yy, xx = np.mgrid[:8, :8]
    assert np.array_equal(grown, yy + xx <= 3)  # 3 rings of 4-neighbours, nothing across the border
    np.testing.assert_allclose(out[grown], np.broadcast_to([1.0, 0.5, 0.0], (int(grown.sum()), 3)))
    assert np.array_equal(image[filled], out[filled])


def test_uv_texture_bake(tmp_path):
    pytest.importorskip("xatlas")
    import trimesh

    field = _sphere_field()
    mesh = export.extract_mesh(field, 32, 25.0)
    texture = export.bake_texture(field, mesh, tmp_path, size=128)
    paths = export.write_mesh(mesh, tmp_path, texture=texture)
    assert paths["texture"].exists() and "map_Kd mesh_albedo.png" in paths["mtl"].read_text()
    loaded = trimesh.load(paths["obj"], force="mesh", process=False)
    assert loaded.visual.kind == "texture" and loaded.visual.uv is not None
    colors = loaded.visual.to_color().vertex_colors[:, :3].astype(float)
    v = np.asarray(loaded.vertices)
    assert colors[v[:, 1] > 0.0, 0].mean() > 180 and colors[v[:, 1] < -0.4, 2].mean() > 180
    # the GLB carries the same texture (glTF base colour), sampled to the same colours
    glb = trimesh.load(paths["glb"], force="mesh", process=False)
    assert glb.visual.kind == "texture" and glb.visual.material.baseColorTexture is not None
    assert len(glb.faces) == len(mesh.faces)
    colors = glb.visual.to_color().vertex_colors[:, :3].astype(float)
    v = np.asarray(glb.vertices)
    assert colors[v[:, 1] > 0.0, 0].mean() > 180 and colors[v[:, 1] < -0.4, 2].mean() > 180
