"""Cameras, field, occupancy grid and renderer."""
import math

import pytest
import torch

from fastdream.cameras import CameraSamplerConfig, generate_rays, look_at, orbit_cameras, orbit_c2w, sample_cameras
from fastdream.field import FieldConfig, HashGridField
from fastdream.occupancy import OccupancyGrid
from fastdream.renderer import RenderConfig, build_renderer

TINY_FIELD = FieldConfig(n_levels=4, log2_hashmap_size=12, base_resolution=8, max_resolution=64, hidden_dim=16, n_hidden_layers=1)


def test_sampled_cameras_respect_ranges():
    cfg = CameraSamplerConfig(elevation_range=(-10, 90), distance_range=(1.0, 1.5), focal_range=(0.7, 1.35))
    cams = sample_cameras(512, 64, 64, scene_radius=2.0, config=cfg, generator=torch.Generator().manual_seed(0))
    assert cams.elevation_deg.min() >= -10 and cams.elevation_deg.max() <= 90
    assert cams.azimuth_deg.min() >= 0 and cams.azimuth_deg.max() < 360
    assert cams.distance.min() >= 2.0 and cams.distance.max() <= 3.0
    assert cams.fx.min() >= 0.7 * 64 - 1e-4 and cams.fx.max() <= 1.35 * 64 + 1e-4
    assert torch.allclose(torch.linalg.vector_norm(cams.position, dim=-1), cams.distance, atol=1e-5)
    # the light sits around the camera: on the camera's side of the object most of the time
    assert (torch.nn.functional.cosine_similarity(cams.light_position, cams.position) > 0).float().mean() > 0.8
    assert cams.ambient.min() >= 0.1 and cams.light_intensity.max() <= 1.0
    # elevation/azimuth describe where the camera actually is
    pos = cams.position / cams.distance[:, None]
    assert torch.allclose(torch.rad2deg(torch.asin(pos[:, 1].clamp(-1, 1))), cams.elevation_deg, atol=0.1)


def test_orbit_frames_are_orthonormal_and_look_at_origin_even_overhead():
    el = torch.tensor([0.0, 45.0, 90.0, -10.0])
    az = torch.tensor([0.0, 90.0, 200.0, 359.0])
    c2w = orbit_c2w(el, az, torch.full((4,), 2.0))
    rot = c2w[:, :3, :3]
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(3).expand(4, 3, 3), atol=1e-5)
    assert torch.allclose(torch.det(rot), torch.ones(4), atol=1e-5)
    forward = -rot[:, :, 2]
    assert torch.allclose(forward, -c2w[:, :3, 3] / 2.0, atol=1e-5)
    # azimuth 0 is the front (+z), elevation 90 is overhead (+y)
    assert torch.allclose(c2w[0, :3, 3], torch.tensor([0.0, 0.0, 2.0]), atol=1e-5)
    assert torch.allclose(c2w[2, :3, 3], torch.tensor([0.0, 2.0, 0.0]), atol=1e-5)
    # image "up" points towards world +y for a camera at the horizon
    assert c2w[0, 1, 1] > 0.99
    # generic look_at agrees with the orbit frame
    assert torch.allclose(look_at(c2w[:2, :3, 3], torch.zeros(2, 3)), c2w[:2], atol=1e-5)


def test_rays_through_centre_pixel_hit_target():
    cams = orbit_cameras(4, 33, 33, elevation_deg=20.0, distance=2.0)
    origins, dirs = generate_rays(cams)
    assert torch.allclose(torch.linalg.vector_norm(dirs, dim=-1), torch.ones(4, 33, 33), atol=1e-5)
    centre = dirs[:, 16, 16]
    assert torch.allclose(centre, -cams.position / 2.0, atol=1e-5)
    # pixel row 0 is the top of the image: its rays point higher than the centre ray
    assert bool((dirs[:, 0, 16, 1] > centre[:, 1]).all())


def test_sampled_cameras_keep_their_random_stream():
    """A seed gives the cameras it always gave: the draws in sample_cameras' documented order (uniform (4, B),
    light noise (B, 3), uniform (3, B)) through the pre-native formulas (scaled draws, orbit c2w, normalised
    light, diffuse share), within 2e-6 (sin/cos rounding)."""
    B, H = 64, 32
    cams = sample_cameras(B, 48, H, scene_radius=1.5, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    camera_u, light_noise, light_u = torch.rand(4, B, generator=g), torch.randn(B, 3, generator=g), torch.rand(3, B, generator=g)
    cfg = CameraSamplerConfig()
    scale = lambda u, lo_hi, s=1.0: lo_hi[0] * s + u * (lo_hi[1] - lo_hi[0]) * s  # noqa: E731
    elevation, azimuth = scale(camera_u[0], cfg.elevation_range), scale(camera_u[1], cfg.azimuth_range)
    distance, focal = scale(camera_u[2], cfg.distance_range, 1.5), scale(camera_u[3], cfg.focal_range, H)
    light_distance = scale(light_u[0], cfg.light_distance_range, 1.5)
    intensity, ambient = scale(light_u[1], cfg.light_intensity_range), scale(light_u[2], cfg.ambient_range)
    c2w = orbit_c2w(elevation, azimuth, distance)
    light = torch.nn.functional.normalize(c2w[:, :3, 2] + light_noise, dim=-1) * light_distance[:, None]
    close = lambda a, b: torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)  # noqa: E731
    for got, want in ((cams.elevation_deg, elevation), (cams.azimuth_deg, azimuth), (cams.distance, distance),
                      (cams.fx, focal), (cams.fy, focal), (cams.c2w, c2w), (cams.light_position, light),
                      (cams.light_intensity, intensity * (1 - ambient)), (cams.ambient, ambient)):
        close(got, want)
    assert torch.equal(cams.cx, torch.full((B,), 24.0)) and torch.equal(cams.cy, torch.full((B,), 16.0))


def test_camera_rays_take_few_ops():
    """The training step's cameras: three draws and one native pass; its rays and per-ray lights: one pass."""
    from benchmarks.bench_overhead import OpCounter
    from fastdream import _backend
    from fastdream.cameras import pixel_rays

    if not _backend.use_native(torch.device("cpu")):
        pytest.skip("native camera ops not built")
    generator = torch.Generator().manual_seed(0)
    sample_cameras(2, 8, 8, generator=generator)  # ranges cached, as from the second step on
    with OpCounter() as counter:
        cams = sample_cameras(2, 8, 8, generator=generator)
    assert counter.ops == 4, counter.by_op
    with OpCounter() as counter:
        pixel_rays(cams)
    assert counter.ops == 1, counter.by_op


def test_background_encoding_is_the_direction_with_its_sines_and_cosines():
    """The background's encoding: [d, sin(2^k pi d), cos(2^k pi d)] (each ordered by component then k), within
    1e-6 in float32 (sin/cos rounding) of the formula, 1e-12 in float64."""
    from fastdream.field import BackgroundModel

    bg = BackgroundModel("mlp", n_frequencies=4)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        d = torch.nn.functional.normalize(torch.randn(500, 3, generator=torch.Generator().manual_seed(0), dtype=dtype), dim=-1)
        angles = d[..., None] * (2.0 ** torch.arange(4, dtype=dtype) * math.pi)
        want = torch.cat([d, torch.sin(angles).flatten(1), torch.cos(angles).flatten(1)], dim=-1)
        got = bg.encode(d)
        assert got.dtype == dtype and got.shape == (500, 27)
        torch.testing.assert_close(got, want, atol=tol, rtol=0)


def test_background_blend_matches_autograd_and_gradcheck():
    """BackgroundModel.over (one autograd node with a hand-written backward) against rgb + (1 - opacity) *
    background through autograd: forward and every gradient within 1e-6 in float32; gradcheck in float64."""
    from fastdream.field import BackgroundModel, _OverLearnedBackground

    torch.manual_seed(0)
    bg = BackgroundModel("mlp", hidden_dim=16)
    g = torch.Generator().manual_seed(1)
    d = torch.nn.functional.normalize(torch.randn(64, 3, generator=g), dim=-1)
    rgb, opacity = torch.rand(64, 3, generator=g).requires_grad_(), torch.rand(64, 1, generator=g).requires_grad_()
    upstream = torch.randn(64, 3, generator=g)
    params = [rgb, opacity, *bg.parameters()]
    fused = bg.over(rgb, opacity, d)
    want = rgb + (1 - opacity) * torch.sigmoid(bg.mlp(bg.encode(d)))
    torch.testing.assert_close(fused, want, atol=1e-6, rtol=0)
    for a, b in zip(torch.autograd.grad(fused, params, upstream), torch.autograd.grad(want, params, upstream)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(bg.over(rgb, opacity, d), want, atol=1e-6, rtol=0)
    bg64 = bg.double()
    enc = bg64.encode(d[:8].double())
    w1, b1, w2, b2 = (p.detach().clone().requires_grad_() for p in (bg64.mlp[0].weight, bg64.mlp[0].bias,
                                                                     bg64.mlp[2].weight, bg64.mlp[2].bias))
    blend = lambda rgb, opacity, enc, w1, w2, b1, b2: _OverLearnedBackground.apply(  # noqa: E731
        rgb, opacity, enc, [w1.t(), w2.t()], w1, w2, b1, b2)
    inputs = (rgb[:8].detach().double().requires_grad_(), opacity[:8].detach().double().requires_grad_(),
              enc.requires_grad_(), w1, w2, b1, b2)
    assert torch.autograd.gradcheck(blend, inputs)


def test_background_blend_takes_few_ops():
    """The learned background over a render, per training step: the encoding (one native pass), the hidden
    layer (addmm + ReLU fused), the output layer, sigmoid and blend forward (6 ops); the hand-written backward, 13."""
    from benchmarks.bench_overhead import OpCounter
    from fastdream import _backend
    from fastdream.field import BackgroundModel

    if not _backend.use_native(torch.device("cpu")):
        pytest.skip("native frequency_encode not built")
    bg = BackgroundModel("mlp")
    d = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
    rgb, opacity = torch.rand(64, 3).requires_grad_(), torch.rand(64, 1).requires_grad_()
    bg.over(rgb, opacity, d)  # the first call caches the weights' transposes (fused_mlp.transposed_weight)
    with OpCounter() as counter:
        out = bg.over(rgb, opacity, d)
    assert counter.ops == 6, counter.by_op
    upstream = torch.ones_like(out)
    with OpCounter() as counter:
        out.backward(upstream)
    # AccumulateGrad's own ops (a detach per new gradient; a copy of rgb's, which is the upstream tensor) aside
    stored = {"aten::detach", "aten::new_empty_strided", "aten::copy_"}
    assert counter.ops - sum(counter.by_op[k] for k in stored) == 13, counter.by_op
    assert rgb.grad is not None and opacity.grad is not None and bg.mlp[0].weight.grad is not None


def test_blob_normals_point_outwards_analytic_and_finite_difference():
    points = torch.nn.functional.normalize(torch.randn(32, 3, generator=torch.Generator().manual_seed(0)), dim=-1) * 0.4
    for mode in ("analytic", "finite_difference"):
        cfg = FieldConfig(**{**TINY_FIELD.__dict__, "normals": mode, "init_scale": 0.0})
        field = HashGridField(config=cfg)
        for p in field.mlp.parameters():
            torch.nn.init.zeros_(p)  # density is the blob alone: radially symmetric
        _, _, normals = field.query(points, need_normals=True)
        cos = torch.nn.functional.cosine_similarity(normals, points, dim=-1)
        assert bool((cos > 0.999).all()), (mode, cos.min())


def test_analytic_and_fd_normals_agree_on_trained_like_field():
    torch.manual_seed(0)
    field = HashGridField(config=FieldConfig(**{**TINY_FIELD.__dict__, "init_scale": 0.5, "normal_epsilon": 1e-3}))
    x = torch.rand(64, 3) * 1.2 - 0.6
    field.config.normals = "analytic"
    n_a = field.query(x, need_normals=True)[2]
    n_fd = field.finite_difference_normals(x)
    cos = torch.nn.functional.cosine_similarity(n_a, n_fd, dim=-1)
    assert cos.median() > 0.9


def test_query_with_fd_normals_matches_separate_queries():
    """query(need_normals=True) evaluates the samples and their probes in one call: the same density, albedo and
    normals (and gradients) as density() and finite_difference_normals() called apart."""
    torch.manual_seed(0)
    field = HashGridField(config=FieldConfig(**{**TINY_FIELD.__dict__, "init_scale": 0.5})).double()
    x = torch.rand(40, 3, dtype=torch.float64) * 1.2 - 0.6
    sigma, albedo, normals = field.query(x, need_normals=True)
    together = torch.autograd.grad((sigma.sum() + albedo.sum() + normals[:, 0].sum()), field.encoding_params)[0]
    apart_sigma, apart_albedo, _ = field.query(x)
    apart_normals = field.finite_difference_normals(x)
    apart = torch.autograd.grad(apart_sigma.sum() + apart_albedo.sum() + apart_normals[:, 0].sum(),
                                field.encoding_params)[0]
    for a, b in ((sigma, apart_sigma), (albedo, apart_albedo), (normals, apart_normals), (together, apart)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_mlp_matches_the_sequential_and_passes_gradcheck():
    """mlp_forward (one autograd node with a hand-written backward) gives the Sequential's outputs and gradients,
    with and without biases, and refuses a second derivative rather than give a wrong one."""
    from fastdream.field import _mlp
    from fastdream.fused_mlp import _MLP, mlp_forward

    torch.manual_seed(0)
    for bias in (True, False):
        mlp = _mlp(6, 8, 2, 4, bias).double()
        x = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
        params = list(mlp.parameters())
        expected = torch.autograd.grad(mlp(x).pow(2).sum(), [x, *params])
        got = torch.autograd.grad(mlp_forward(mlp, x).pow(2).sum(), [x, *params])
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
        linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
        biases = [m.bias for m in linears]
        fn = lambda x, w0, w1, w2: _MLP.apply(x, [w0.t(), w1.t(), w2.t()], w0, w1, w2, *biases)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, *(m.weight for m in linears)))
    y = mlp_forward(mlp, x)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


def test_fused_mlp_follows_weight_updates_and_conversions():
    """mlp_forward keeps each weight's transpose on the module: it must see in-place updates (an optimizer
    step, load_state_dict) and be made again when the weights become other tensors (.double())."""
    from fastdream.field import _mlp
    from fastdream.fused_mlp import mlp_forward

    torch.manual_seed(0)
    mlp, x = _mlp(5, 8, 2, 3), torch.randn(7, 5)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.5)
    for _ in range(2):
        out = mlp_forward(mlp, x)
        torch.testing.assert_close(out, mlp(x), rtol=0, atol=0)
        out.square().sum().backward()
        opt.step()
        with torch.no_grad():
            torch.testing.assert_close(mlp_forward(mlp, x), mlp(x), rtol=0, atol=0)
    mlp.load_state_dict(_mlp(5, 8, 2, 3).state_dict())
    torch.testing.assert_close(mlp_forward(mlp, x), mlp(x), rtol=0, atol=0)
    mlp.double()
    torch.testing.assert_close(mlp_forward(mlp, x.double()), mlp(x.double()), rtol=0, atol=0)


def test_analytic_normals_are_differentiable_for_training():
    field = HashGridField(config=FieldConfig(**{**TINY_FIELD.__dict__, "normals": "analytic"}))
    x = torch.rand(16, 3) - 0.5
    _, _, normals = field.query(x, need_normals=True)
    normals[:, 0].sum().backward()
    assert field.encoding_params.grad is not None and field.encoding_params.grad.abs().sum() > 0


def test_analytic_normals_without_a_graph_compute_no_grid_gradient(monkeypatch):
    """Rendering normals (no training graph) asks the hash backward for dL/dx only: no grid-sized
    parameter gradient is computed and thrown away. The normals are the same as with the graph."""
    from fastdream import _backend

    if _backend.extension() is None:
        pytest.skip(f"native extension not built ({_backend.extension_error()})")
    from fastdream.ops import _native

    flags, real = [], _native.ops

    class Spy:
        def __getattr__(self, name):
            op = getattr(real, name)
            if name != "hash_encode_bwd":
                return op
            return lambda *args: flags.append(args[-2]) or op(*args)  # need_params_grad

    field = HashGridField(config=FieldConfig(**{**TINY_FIELD.__dict__, "normals": "analytic", "init_scale": 0.3}))
    x = torch.rand(32, 3) - 0.5
    with_graph = field.query(x, need_normals=True)[2].detach()
    monkeypatch.setattr(_native, "ops", Spy())
    field.eval()
    without = field.query(x, need_normals=True)[2]
    assert flags == [False]
    assert torch.equal(without, with_graph)


def test_occupancy_grid_marks_dense_region_only():
    grid = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=16, warmup_steps=10)
    ball = lambda x: (torch.linalg.vector_norm(x, dim=-1) < 0.5).float() * 10.0  # noqa: E731
    grid.update(0, ball)
    centres = grid.cell_centres(torch.arange(16 ** 3), jitter=False)
    inside = torch.linalg.vector_norm(centres, dim=-1) < 0.4
    outside = torch.linalg.vector_norm(centres, dim=-1) > 0.7
    occ = grid.binary.reshape(-1)
    assert bool(occ[inside].all()) and not bool(occ[outside].any())
    # after warm-up the EMA lets space the object left fade out of the grid
    small_ball = lambda x: (torch.linalg.vector_norm(x, dim=-1) < 0.25).float() * 10.0  # noqa: E731
    for step in range(10, 250):
        grid.update(step, small_ball)
    occ = grid.binary.reshape(-1)
    radius = torch.linalg.vector_norm(centres, dim=-1)
    assert bool(occ[radius < 0.15].all()) and not bool(occ[radius > 0.45].any())


def test_occupancy_grid_never_occupies_cells_no_camera_sees():
    """mark_invisible_cells: a cell is visible when a corner projects into an image in front of a camera
    (checked here by projecting through cameras.generate_rays' pinhole convention); invisible cells stay
    empty under a field that is dense everywhere, visible ones fill."""
    from fastdream.cameras import orbit_c2w

    grid = OccupancyGrid([-3, -3, -3, 3, 3, 3], resolution=12, warmup_steps=10)
    c2w = orbit_c2w(torch.tensor([0.0, 30.0]), torch.tensor([0.0, 90.0]), torch.tensor([2.0, 2.0]))
    w, h, f = 16, 12, 10.0  # the cameras sit inside the box: part of it is behind or beside both views
    visible = grid.mark_invisible_cells(c2w, torch.full((2,), f), torch.full((2,), f), torch.full((2,), w / 2),
                                        torch.full((2,), h / 2), w, h)
    corners = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]).float()
    pts = (grid.cells[:, None, :].float() + corners) / 12 * 6 - 3  # (C, 8, 3)
    expected = torch.zeros(12 ** 3, dtype=torch.bool)
    for k in range(2):
        rel = pts - c2w[k, :3, 3]
        cam = rel @ c2w[k, :3, :3]  # world -> camera (rotation is orthonormal)
        z = -cam[..., 2]
        u, v = f * cam[..., 0] / z + w / 2, -f * cam[..., 1] / z + h / 2
        expected |= ((z > 0) & (u >= 0) & (u <= w) & (v >= 0) & (v <= h)).any(dim=1)
    assert torch.equal(grid.visible, expected)
    assert visible == pytest.approx(expected.float().mean().item()) and 0.05 < visible < 0.9
    dense = lambda x: torch.full((x.shape[0],), 5.0)  # noqa: E731
    for step in range(0, 40, 4):
        grid.update(step, dense)
    assert torch.equal(grid.binary.reshape(-1), expected)
    assert float(grid.occupancy[~expected].abs().max()) == 0.0


def test_occupancy_update_points_follow_a_loaded_box_in_few_ops():
    """The update's jittered points (a gather of each cell's corner and one addcmul) lie in the grid's box, also
    when a state dict with another box was loaded, and the cell centres follow it; after the warm-up an update dispatches 11 ops besides the
    density query (the step that updates the grid dispatches the most ops of any training step)."""
    from benchmarks.bench_overhead import OpCounter

    grid = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=8, warmup_steps=2)
    grid.load_state_dict(OccupancyGrid([-2, 0, 0, 2, 4, 2], resolution=8).state_dict())
    seen = []

    def opacity(x):
        seen.append(x)
        return x[:, 0].clone()

    counter = OpCounter()
    with counter:
        grid.update(5, opacity, generator=torch.Generator().manual_seed(0))
    assert counter.ops - 2 == 11, counter.by_op  # the density query here: two ops (select, clone)
    x = seen[0]
    assert x.shape == (2 * (8**3 // 4), 3)
    cell = torch.floor((x - torch.tensor([-2.0, 0, 0])) / torch.tensor([0.5, 0.5, 0.25])).long()
    assert bool(((cell >= 0) & (cell < 8)).all())
    centres = grid.cell_centres(torch.arange(8**3), jitter=False)
    torch.testing.assert_close(centres, (grid.cells + 0.5) / 8 * torch.tensor([4.0, 4, 2]) + torch.tensor([-2.0, 0, 0]))


def _ball_renderer(shading_radius=0.5):
    renderer = build_renderer(field_config=TINY_FIELD, render_config=RenderConfig(samples_per_ray=96),
                              background="fixed", background_color=(0.0, 0.0, 0.0), grid_resolution=16)

    class Ball(torch.nn.Module):
        aabb = renderer.field.aabb

        def density(self, x):
            return (torch.linalg.vector_norm(x, dim=-1) < shading_radius).float() * 50.0

        def query(self, x, need_normals=False):
            n = torch.nn.functional.normalize(x, dim=-1) if need_normals else None
            albedo = torch.tensor([0.8, 0.4, 0.2]).expand(x.shape[0], 3)
            return self.density(x), albedo, n

    renderer.field = Ball()
    return renderer


def test_render_ball_silhouette_depth_and_shading():
    renderer = _ball_renderer()
    cams = orbit_cameras(2, 24, 24, elevation_deg=0.0, distance=2.0, fov_y_deg=60.0)
    with torch.no_grad():
        out = renderer.render(cams, shading="albedo")
    # centre pixel: opaque, albedo colour, depth = distance - radius (to within a step)
    assert out.opacity[0, 12, 12, 0] > 0.99
    assert torch.allclose(out.rgb[0, 12, 12], torch.tensor([0.8, 0.4, 0.2]), atol=1e-2)
    assert abs(float(out.depth[0, 12, 12, 0]) - 1.5) < 0.05
    # corner pixel misses the ball: transparent, background black
    assert out.opacity[0, 0, 0, 0] < 1e-3 and out.rgb[0, 0, 0].abs().max() < 1e-3
    # projected disc area matches the ball's silhouette: radius r/sqrt(d^2-r^2) in tan units
    focal = float(cams.fy[0])
    expected_radius_px = focal * 0.5 / math.sqrt(2.0 ** 2 - 0.5 ** 2)
    area = float((out.opacity[0, :, :, 0] > 0.5).sum())
    assert abs(area - math.pi * expected_radius_px ** 2) / area < 0.15
    # textureless, lit from the camera: the centre faces the light, the rim is darker
    with torch.no_grad():
        shaded = renderer.render(cams, shading="textureless")
    assert shaded.rgb[0, 12, 12, 0] > shaded.rgb[0, 12, 12 + int(expected_radius_px) - 1, 0]
    assert torch.allclose(shaded.rgb[0, 12, 12], shaded.rgb[0, 12, 12, :1].expand(3))  # grey: no albedo


def test_render_with_gradients_reaches_field_and_background():
    torch.manual_seed(0)
    renderer = build_renderer(field_config=TINY_FIELD, render_config=RenderConfig(samples_per_ray=64), grid_resolution=16)
    cams = sample_cameras(1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = renderer.render(cams, shading="lambertian", need_normals=True)
    assert out.rgb.shape == (1, 16, 16, 3) and out.n_samples > 0
    assert out.rays.sample_normals is not None and out.rays.weights.shape[0] == out.n_samples
    (out.rgb.mean() + out.opacity.mean()).backward()
    assert renderer.field.encoding_params.grad.abs().sum() > 0
    assert all(p.grad is not None for p in renderer.background.parameters())


def test_near_camera_gradient_scaling_in_the_render():
    """RenderConfig.near_gradient_distance: the render is unchanged, and the field's gradient is each sample's
    scaled by min(1, (t / d)^2): with d beyond every sample it is the unscaled one's t^2 / d^2 share, so doubling
    d quarters it exactly; with d short of every sample it is the unscaled gradient."""
    torch.manual_seed(0)
    renderer = build_renderer(field_config=TINY_FIELD, render_config=RenderConfig(samples_per_ray=64), grid_resolution=16)
    cams = sample_cameras(1, 16, 16, generator=torch.Generator().manual_seed(0))

    def run(distance):
        renderer.config.near_gradient_distance = distance
        renderer.zero_grad(set_to_none=True)
        out = renderer.render(cams, shading="lambertian", need_normals=True)
        (out.rgb.mean() + out.opacity.mean()).backward()
        assert float(out.rays.t_ends.max()) < 10.0
        return out.rgb.detach(), renderer.field.encoding_params.grad.clone(), renderer.field.mlp[0].weight.grad.clone()

    rgb_off, *grads_off = run(0.0)
    rgb_near, *grads_near = run(1e-6)
    rgb_far, *grads_far = run(10.0)
    _, *grads_farther = run(20.0)
    assert torch.equal(rgb_off, rgb_near) and torch.equal(rgb_off, rgb_far)
    for off, near, far, farther in zip(grads_off, grads_near, grads_far, grads_farther):
        torch.testing.assert_close(near, off, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(farther * 4.0, far, rtol=1e-4, atol=1e-9)
        assert float(far.abs().sum()) < 0.2 * float(off.abs().sum())  # t < 4 < d: at most (4/10)^2 of it
