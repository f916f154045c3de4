"""The DreamFusion recipe's defaults: initial density blob, light cap, regularisers, schedules."""
import itertools

import pytest
import torch

from fastdream.cameras import CameraBatch, CameraSamplerConfig, generate_rays, orbit_c2w, sample_cameras
from fastdream.config import RunConfig
from fastdream.stages.nerf import build_run_renderer


def _camera(elevation, distance, focal_multiplier, size, light_intensity=1.0, ambient=0.0):
    c2w = orbit_c2w(torch.tensor([float(elevation)]), torch.tensor([30.0]), torch.tensor([float(distance)]))
    f = torch.tensor([focal_multiplier * size])
    half = torch.tensor([size / 2.0])
    return CameraBatch(c2w=c2w, fx=f, fy=f.clone(), cx=half, cy=half.clone(), width=size, height=size,
                       elevation_deg=torch.tensor([float(elevation)]), azimuth_deg=torch.tensor([30.0]),
                       distance=torch.tensor([float(distance)]), light_position=c2w[:, :3, 3],
                       light_intensity=torch.tensor([light_intensity]), ambient=torch.tensor([ambient]))


@pytest.fixture(scope="module")
def default_renderer():
    torch.manual_seed(0)
    renderer = build_run_renderer(RunConfig(), torch.device("cpu"))
    renderer.eval()
    return renderer


def test_initial_blob_leaves_the_image_corners_transparent(default_renderer):
    """From the extreme training cameras (nearest/farthest, widest/narrowest, lowest/highest) the untrained
    field must let the background through at the image corners, so the background model gets gradients."""
    cfg = RunConfig().camera
    size = RunConfig().height  # the training resolution: corner pixels at the training field of view
    corner_opacity = {}
    for elevation, distance, focal in itertools.product(cfg.elevation_range, cfg.distance_range, cfg.focal_range):
        origins, directions = generate_rays(_camera(elevation, distance, focal, size))
        pick = [(0, 0), (0, -1), (-1, 0), (-1, -1), (size // 2, size // 2)]  # the four corners, the centre
        o = torch.stack([origins[0, i, j] for i, j in pick])
        d = torch.stack([directions[0, i, j] for i, j in pick])
        with torch.no_grad():
            op = default_renderer.render_rays(o, d).opacity[:, 0]
        corner_opacity[(elevation, distance, focal)] = float(op[:4].max())
        assert float(op[4]) > 0.99  # the blob itself is there and opaque
    # the nearest camera with the narrowest field of view sees the blob (radius 0.5 R) fill most of its frame
    near_narrow = max(v for (e, d, f), v in corner_opacity.items() if d == cfg.distance_range[0] and f == cfg.focal_range[1])
    others = max(v for (e, d, f), v in corner_opacity.items() if not (d == cfg.distance_range[0] and f == cfg.focal_range[1]))
    assert near_narrow < 0.7, corner_opacity
    assert others < 0.05, corner_opacity


def test_sampled_light_never_exceeds_one():
    cams = sample_cameras(4096, 8, 8, config=CameraSamplerConfig(), generator=torch.Generator().manual_seed(0))
    total = cams.light_intensity + cams.ambient
    assert float(total.max()) <= 1.0 + 1e-6
    assert float(cams.ambient.min()) >= 0.1 and float(cams.light_intensity.min()) >= 0.7 * 0.6 - 1e-6


def test_textureless_renders_stay_in_unit_range(default_renderer):
    """White albedo under the sampled lights: the brightest lit pixels reach at most 1."""
    cams = sample_cameras(32, 8, 8, config=CameraSamplerConfig(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = default_renderer.render(cams, shading="textureless")
    assert float(out.rgb.max()) <= 1.0 + 1e-5 and float(out.rgb.min()) >= 0.0
    assert float(out.rgb.max()) > 0.9  # some pixels are lit nearly to the cap


def test_regulariser_weight_schedules():
    reg = RunConfig().reg
    assert reg.weights(0.0) == {"orient": 10.0, "entropy": 0.0, "sparsity": 1.0}
    w = reg.weights(0.25)
    assert w["orient"] == pytest.approx(505.0) and w["entropy"] == pytest.approx(5e-4)
    assert reg.weights(0.5) == reg.weights(1.0) == {"orient": 1000.0, "entropy": pytest.approx(1e-3), "sparsity": 1.0}


class _NoSDS:
    """Guidance contributing nothing, so that one regulariser alone moves the parameters."""

    def __call__(self, images, cameras, shading, progress, **_):
        from types import SimpleNamespace

        return SimpleNamespace(loss=images.sum() * 0.0, t=torch.zeros(images.shape[0]), grad_norm=images.new_zeros(()))


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    import numpy as np

    from fastdream.demo import demo_scene

    path = tmp_path_factory.mktemp("scene") / "scene.npz"
    np.savez(path, **demo_scene(8))
    return path


@pytest.mark.parametrize("term", ["orient", "entropy", "sparsity", None])
def test_each_regulariser_reaches_the_parameters_on_albedo_steps(tmp_path, tiny_scene, term):
    from fastdream.config import apply_overrides
    from fastdream.guidance.reference import _configure_run as prepare_reference
    from fastdream.train import Trainer

    weights = {"orient": "reg.orientation", "entropy": "reg.opacity_entropy", "sparsity": "reg.opacity_sparsity"}
    sets = ["steps=10", "width=8", "height=8", "field.n_levels=4", "field.log2_hashmap_size=10",
            "field.max_resolution=64", "field.hidden_dim=16", "field.n_hidden_layers=1", "render.samples_per_ray=32",
            "grid.resolution=16", "shading.albedo_only_fraction=1.0", "guidance.kind=reference",
            f"guidance.reference_scene={tiny_scene}", "guidance.reference_resolution=8"]
    sets += [f"{key}={1.0 if name == term else 0.0}" for name, key in weights.items()]
    config = apply_overrides(RunConfig(prompt="scene", device="cpu"), sets)
    prepare_reference(config)
    trainer = Trainer(config, tmp_path, quiet=True, device=torch.device("cpu"))
    trainer.guidance = _NoSDS()
    before = trainer.renderer.field.encoding_params.detach().clone()
    result = trainer.train_step(5)  # progress 0.5: every ramp has started
    assert result["shading"] == "albedo" and result["finite"]
    moved = not torch.equal(before, trainer.renderer.field.encoding_params.detach())
    if term is None:
        assert not moved and set(result["terms"]) == {"sds"}
    else:
        assert moved and result["terms"][term] > 0, result


def test_progressive_levels_feed_coarse_levels_first():
    from fastdream.field import FieldConfig, HashGridField

    cfg = FieldConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=64, hidden_dim=16,
                      n_hidden_layers=1, progressive_start_levels=2, progressive_every=0.25)
    torch.manual_seed(0)
    field = HashGridField(config=cfg)
    field.encoding_params.data.uniform_(-0.5, 0.5)
    x = torch.rand(256, 3) * 2 - 1

    def grad_support(progress):
        field.set_progress(progress)
        field.encoding_params.grad = None
        field.density(x).sum().backward()
        return field.encoding_params.grad != 0

    assert field.active_levels == 4  # untrained / exported fields use every level
    early, middle, late = grad_support(0.0), grad_support(0.3), grad_support(1.0)
    assert (field.active_levels, int(early.sum()) > 0) == (4, True)
    assert bool((early <= middle).all() and (middle <= late).all())
    assert int(early.sum()) < int(middle.sum()) < int(late.sum())
    off = HashGridField(config=FieldConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=64))
    off.set_progress(0.0)
    assert off.active_levels == 4  # off by default


def test_random_solid_backgrounds():
    from fastdream.field import FieldConfig
    from fastdream.renderer import build_renderer

    torch.manual_seed(0)
    renderer = build_renderer(field_config=FieldConfig(n_levels=2, log2_hashmap_size=8, max_resolution=16, hidden_dim=8,
                                                       n_hidden_layers=1))
    cams = sample_cameras(64, 4, 4, generator=torch.Generator().manual_seed(0))
    _, directions = generate_rays(cams)
    model = renderer.background(directions.reshape(-1, 3)).reshape(64, 16, 3)
    with torch.no_grad():
        bg = renderer.random_solid_background(cams, 0.5, torch.Generator().manual_seed(1)).reshape(64, 16, 3)
        solid = (bg == bg[:, :1]).all(-1).all(-1)
        assert torch.equal(bg[~solid], model[~solid])  # the other images keep the background model
        assert 16 <= int(solid.sum()) <= 48  # about half of the images
        assert float(bg[solid].std(0).min()) > 0.1  # random colours, not one
        never = renderer.random_solid_background(cams, 0.0, torch.Generator().manual_seed(1)).reshape(64, 16, 3)
        assert torch.equal(never, model)
    # reference guidance renders its target over a fixed colour: a random one is refused
    from fastdream.config import apply_overrides
    from fastdream.errors import FastDreamError

    with pytest.raises(FastDreamError, match="random_background must be 0 with reference guidance"):
        apply_overrides(RunConfig(), ["random_background=0.5", "guidance.kind=reference",
                                      "guidance.reference_scene=x.npz"]).validate()


def test_camera_jitter_moves_cameras_but_keeps_them_looking_at_the_scene():
    base = sample_cameras(256, 8, 8, config=CameraSamplerConfig(), generator=torch.Generator().manual_seed(3))
    jcfg = CameraSamplerConfig(position_jitter=0.1, target_jitter=0.2, up_jitter=0.02)
    jit = sample_cameras(256, 8, 8, config=jcfg, generator=torch.Generator().manual_seed(3))
    # the same draws for angles and distance (the jitter comes after them), the poses perturbed
    assert torch.equal(base.elevation_deg, jit.elevation_deg) and torch.equal(base.distance, jit.distance)
    shift = torch.linalg.vector_norm(jit.position - base.position, dim=-1)
    assert 0.1 < float(shift.mean()) < 0.25  # std 0.1 per axis: mean length about 0.16
    rot = jit.c2w[:, :3, :3]
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(3).expand(256, 3, 3), atol=1e-5)
    # the optical axis passes within a few target-jitter stds of the centre
    forward = -rot[:, :, 2]
    miss = torch.linalg.vector_norm(torch.cross(forward, -jit.position, dim=-1), dim=-1)
    assert float(miss.max()) < 1.0 and float(miss.mean()) > 0.05
    # off by default: the orbit frames, exactly
    assert torch.equal(base.c2w, sample_cameras(256, 8, 8, generator=torch.Generator().manual_seed(3)).c2w)
