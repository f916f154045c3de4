"""The mesh renderer: camera conventions shared with the NeRF renderer, shading, silhouette gradients (a DMTet
fitted to target masks through rasterize, antialias and marching tets), and the mesh regularisers."""
from __future__ import annotations

import math

import pytest
import torch

from fastdream import ops
from fastdream.cameras import generate_rays, orbit_cameras, sample_cameras, CameraSamplerConfig
from fastdream.dmtet import DMTetGeometry
from fastdream.errors import FastDreamError
from fastdream.field import FieldConfig
from fastdream.mesh_renderer import clip_positions, render_mesh
from fastdream.regularizers import laplacian_smoothness, normal_consistency
from fastdream.renderer import RenderConfig, build_renderer
from fastdream.tets import marching_tets, tet_grid

CENTRE, RADIUS, ALBEDO = torch.tensor([0.25, 0.15, -0.1]), 0.45, torch.tensor([0.8, 0.4, 0.2])


def _ball_sdf(points):
    return torch.linalg.vector_norm(points - CENTRE, dim=-1) - RADIUS


@pytest.fixture(scope="module")
def ball_mesh():
    vertices, tets = tet_grid(40)
    return marching_tets(vertices, tets, _ball_sdf(vertices))


def _ball_nerf():
    """The same off-centre ball as a radiance field: an opaque step in density, its true normals."""
    renderer = build_renderer(field_config=FieldConfig(n_levels=2, log2_hashmap_size=8, base_resolution=4,
                                                       max_resolution=8, hidden_dim=8, n_hidden_layers=1),
                              render_config=RenderConfig(samples_per_ray=1024), background="fixed",
                              background_color=(0.0, 0.0, 0.0), grid_resolution=16)

    class Ball(torch.nn.Module):
        aabb = renderer.field.aabb

        def density(self, x):
            return (_ball_sdf(x) < 0).float() * 1000.0

        def query(self, x, need_normals=False):
            n = torch.nn.functional.normalize(x - CENTRE, dim=-1) if need_normals else None
            return self.density(x), ALBEDO.expand(x.shape[0], 3), n

    renderer.field = Ball()
    return renderer


def test_clip_positions_put_a_point_on_the_pixel_whose_ray_passes_through_it():
    cams = sample_cameras(3, 24, 16, config=CameraSamplerConfig(position_jitter=0.1, target_jitter=0.2, up_jitter=0.05),
                          generator=torch.Generator().manual_seed(3))
    cams.cx = cams.cx + torch.tensor([0.3, -1.2, 2.0])  # off-centre principal points
    origins, dirs = generate_rays(cams)
    rows, cols = torch.tensor([0, 5, 15, 9]), torch.tensor([0, 23, 7, 12])
    for b in range(3):
        points = origins[b, rows, cols] + dirs[b, rows, cols] * torch.tensor([0.5, 1.0, 2.0, 3.0])[:, None]
        clip = clip_positions(points, cams[b])[0]
        ndc = clip[:, :2] / clip[:, 3:]
        expected = torch.stack([(2 * cols + 1) / 24 - 1, (2 * rows + 1) / 16 - 1], -1).float()
        assert torch.allclose(ndc, expected, atol=1e-4)
        assert bool(((clip[:, 2] / clip[:, 3]).abs() < 1).all())


def test_a_mesh_renders_at_the_same_pixels_depth_and_shade_as_the_radiance_field_of_the_same_shape(ball_mesh):
    verts, faces = ball_mesh
    cams = orbit_cameras(3, 40, 32, elevation_deg=25.0, distance=2.2, fov_y_deg=50.0, start_azimuth_deg=30.0)
    nerf = _ball_nerf()
    with torch.no_grad():
        ref = nerf.render(cams, shading="lambertian", background=torch.zeros(3))
        out = render_mesh(verts, faces, cams, color_fn=lambda p: ALBEDO.expand(p.shape[0], 3), shading="lambertian",
                          background=torch.zeros(3))
    a, b = ref.opacity[..., 0] > 0.5, out.tri_id >= 0  # the NeRF ball is opaque: its coverage is hard too
    iou = float((a & b).sum() / (a | b).sum())
    assert iou > 0.97, iou
    pix = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(40.0), indexing="ij"), -1)
    for k in range(3):  # the silhouettes' centroids agree to a fraction of a pixel (no flip, no shift)
        ca, cb = pix[a[k]].mean(0), pix[b[k]].mean(0)
        assert float((ca - cb).abs().max()) < 0.2, (k, ca, cb)
    inner = a & b & (out.tri_id >= 0)
    inner &= torch.nn.functional.max_pool2d((~(a & b)).float()[:, None], 5, 1, 2)[:, 0] == 0  # away from the outline
    assert float((ref.depth[..., 0] - out.depth[..., 0])[inner].abs().max()) < 0.02
    assert float((ref.normal - out.normal)[inner].norm(dim=-1).max()) < 0.1
    diff = (ref.rgb - out.rgb)[inner].abs()  # exact normals against a 40^3 grid's interpolated ones
    assert float(diff.max()) < 0.08 and float(diff.mean()) < 0.02


def test_shading_modes_and_what_color_fn_sees(ball_mesh):
    verts, faces = ball_mesh
    cams = orbit_cameras(2, 24, 24, distance=2.0)
    seen = []

    def color_fn(points):
        seen.append(points.shape[0])
        assert bool((_ball_sdf(points).abs() < 0.01).all())  # surface points only
        return ALBEDO.expand(points.shape[0], 3)

    albedo = render_mesh(verts, faces, cams, color_fn=color_fn, shading="albedo", background=(0.0, 0.0, 1.0))
    assert seen == [int((albedo.tri_id >= 0).sum())]
    covered = albedo.tri_id >= 0
    hard = covered & (albedo.opacity[..., 0] == 1)
    assert torch.allclose(albedo.rgb[hard], ALBEDO.expand(int(hard.sum()), 3), atol=1e-6)
    assert torch.allclose(albedo.rgb[albedo.opacity[..., 0] == 0], torch.tensor([0.0, 0.0, 1.0]))
    textureless = render_mesh(verts, faces, cams, shading="textureless")
    assert len(seen) == 1  # not asked for albedo
    grey = textureless.rgb[hard]
    assert torch.allclose(grey, grey[:, :1].expand_as(grey))
    # lambertian = albedo x the textureless intensity (ops.shade's rule)
    lit = render_mesh(verts, faces, cams, color_fn=color_fn, shading="lambertian")
    assert torch.allclose(lit.rgb[hard], ALBEDO * grey, atol=1e-6)
    # flat normals are the faces' own
    flat = render_mesh(verts, faces, cams, shading="textureless", normals="face")
    assert float((flat.normal - textureless.normal)[hard].norm(dim=-1).max()) < 0.2


def test_background_forms(ball_mesh):
    verts, faces = ball_mesh
    cams = orbit_cameras(2, 16, 12, distance=2.0)
    per_pixel = torch.rand(2, 12, 16, 3)
    for bg, expected in ((per_pixel, per_pixel), (per_pixel.reshape(-1, 3), per_pixel),
                         (lambda d: d.abs(), generate_rays(cams)[1].abs())):
        out = render_mesh(verts, faces, cams, shading="textureless", background=bg)
        empty = out.opacity[..., 0] == 0
        assert torch.allclose(out.rgb[empty], expected[empty], atol=1e-6)
    assert render_mesh(verts, faces, cams, shading="textureless", resolution=(8, 6)).rgb.shape == (2, 8, 6, 3)


def test_render_mesh_refuses_bad_arguments(ball_mesh):
    verts, faces = ball_mesh
    cams = orbit_cameras(1, 8, 8)
    with pytest.raises(FastDreamError, match="color_fn"):
        render_mesh(verts, faces, cams, shading="albedo")
    with pytest.raises(FastDreamError, match="normals"):
        render_mesh(verts, faces, cams, shading="textureless", normals="smooth")
    with pytest.raises(FastDreamError, match="background"):
        render_mesh(verts, faces, cams, shading="textureless", background=torch.zeros(5, 3))
    with pytest.raises(FastDreamError, match="shading"):
        render_mesh(verts, faces, cams, shading="phong", color_fn=lambda p: p)
    with pytest.raises(FastDreamError, match="faces"):
        render_mesh(verts, faces.int(), cams, shading="textureless")


def test_an_empty_mesh_renders_the_background():
    cams = orbit_cameras(1, 8, 8)
    out = render_mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64), cams, shading="textureless",
                      background=(0.2, 0.3, 0.4))
    assert torch.allclose(out.rgb, torch.tensor([0.2, 0.3, 0.4]).expand(1, 8, 8, 3)) and float(out.opacity.sum()) == 0


def test_fitting_a_dmtet_to_target_silhouettes_through_the_rasterizer_reduces_the_error():
    """Gradients of a mask loss reach sdf and deform only through antialias (the outline), rasterize's
    barycentrics and marching tets' crossing points: the fit must shrink the error from a ball to an ellipsoid."""
    torch.manual_seed(0)
    cams = orbit_cameras(4, 32, 32, elevation_deg=20.0, distance=2.5, fov_y_deg=45.0, start_azimuth_deg=10.0)
    cams = cams[0:4]
    axes = torch.tensor([0.7, 0.4, 0.55])
    vertices, tets = tet_grid(32)
    target_mesh = marching_tets(vertices, tets, (torch.linalg.vector_norm(vertices / axes, dim=-1) - 1) * 0.5)
    with torch.no_grad():
        target = render_mesh(*target_mesh, cams, shading="textureless").opacity
    geometry = DMTetGeometry(12)  # starts as a ball of radius 0.5
    optimiser = torch.optim.Adam(geometry.parameters(), lr=0.01)
    errors = []
    for step in range(40):
        verts, faces = geometry.extract()
        out = render_mesh(verts, faces, cams, shading="textureless")
        loss = (out.opacity - target).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        errors.append(float(loss.detach()))
    assert errors[-1] < 0.3 * errors[0], errors
    assert float(geometry.deform.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------ regularisers

def test_normal_consistency_is_one_minus_the_cosine_of_the_dihedral_angle():
    theta = 0.7
    verts = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                          [math.cos(theta), 0.0, -math.sin(theta)]], requires_grad=True)  # a hinge along the x axis
    faces = torch.tensor([[0, 1, 2], [1, 0, 3]])
    n1 = torch.tensor([0.0, 0.0, 1.0])
    v = verts.detach()
    n2 = torch.nn.functional.normalize(torch.linalg.cross(v[0] - v[1], v[3] - v[1]), dim=0)
    assert math.isclose(float(normal_consistency(verts, faces).detach()), 1 - float(n1 @ n2), rel_tol=1e-5)
    normal_consistency(verts, faces).backward()
    assert verts.grad.abs().sum() > 0
    # a flat sheet costs nothing; boundary edges are ignored
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 2)
    sheet = torch.cat([grid, torch.zeros(16, 1)], 1)
    idx = torch.arange(16).reshape(4, 4)
    a, b, c, d = idx[:-1, :-1].reshape(-1), idx[:-1, 1:].reshape(-1), idx[1:, :-1].reshape(-1), idx[1:, 1:].reshape(-1)
    tri = torch.cat([torch.stack([a, c, d], -1), torch.stack([a, d, b], -1)])
    assert float(normal_consistency(sheet, tri)) < 1e-7
    assert float(laplacian_smoothness(sheet, tri)) > 0  # boundary vertices pull inwards
    interior = [5, 6, 9, 10]
    lap = _dense_uniform_laplacian(sheet, tri) @ sheet
    assert float(lap[interior].abs().max()) < 1e-6


def _dense_uniform_laplacian(verts, faces):
    n = verts.shape[0]
    adjacency = torch.zeros(n, n)
    for f in faces.tolist():
        for i in range(3):
            adjacency[f[i], f[(i + 1) % 3]] = adjacency[f[(i + 1) % 3], f[i]] = 1
    return torch.diag(adjacency.sum(1)) - adjacency


def test_laplacian_smoothness_matches_the_dense_uniform_laplacian():
    g = torch.Generator().manual_seed(0)
    verts = torch.randn(12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    faces = torch.randint(0, 12, (20, 3), generator=g)
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    expected = (_dense_uniform_laplacian(verts.detach(), faces).double() @ verts).norm(dim=-1).mean()
    assert torch.allclose(laplacian_smoothness(verts, faces), expected)
    assert torch.autograd.gradcheck(lambda v: laplacian_smoothness(v, faces), (verts,))
    # descending either regulariser smooths a noisy sphere
    vertices, tets = tet_grid(12)
    v0, f0 = marching_tets(vertices, tets, _ball_sdf(vertices) + 1e-3)
    noisy = (v0 + 0.003 * torch.randn(v0.shape, generator=g)).requires_grad_(True)
    start = (float(normal_consistency(noisy, f0).detach()), float(laplacian_smoothness(noisy, f0).detach()))
    opt = torch.optim.Adam([noisy], lr=1e-3)
    for _ in range(30):
        opt.zero_grad()
        (normal_consistency(noisy, f0) + 0.1 * laplacian_smoothness(noisy, f0)).backward()
        opt.step()
    assert float(normal_consistency(noisy, f0).detach()) < 0.7 * start[0] and float(laplacian_smoothness(noisy, f0).detach()) < start[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_dmtet_extraction_and_render_on_cuda_match_the_cpu():
    geometry = DMTetGeometry(16)
    cams = orbit_cameras(2, 48, 40, distance=2.2)
    out = {}
    for device in ("cpu", "cuda"):
        g = geometry.to(device)
        g.zero_grad(set_to_none=True)
        verts, faces = g.extract()
        render = render_mesh(verts, faces, cams.to(device), color_fn=lambda p: torch.sigmoid(3 * p), shading="lambertian")
        (render.rgb.mean() + render.opacity.mean()).backward()
        out[device] = [t.detach().cpu() for t in (verts, render.rgb, render.opacity, g.sdf.grad, g.deform.grad)]
        out[device].append(faces.cpu())
    assert torch.equal(out["cpu"][-1], out["cuda"][-1])
    for a, b in zip(out["cpu"][:-1], out["cuda"][:-1]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
