"""The DreamFusion recipe's defaults: initial density blob, light cap, regularisers, schedules."""
import itertools

import pytest
import torch

from fastdream.cameras import CameraBatch, CameraSamplerConfig, generate_rays, orbit_c2w, sample_cameras
from fastdream.config import RunConfig
from fastdream.train import build_run_renderer


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
