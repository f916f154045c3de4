"""Cameras and lights: DreamFusion's random sampling, look-at geometry and pinhole rays.

World is y-up (like glTF/OBJ). A camera at elevation e, azimuth a, distance d sits at
d * (cos e sin a, sin e, cos e cos a) looking at the origin: azimuth 0 is the object's front (+z),
elevation 90 is straight overhead. Camera frames follow the OpenGL convention (camera looks down -z,
+y up in the image), like NeRF-synthetic transforms.json.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch

from . import ops
from .errors import check
from .ops.cameras import orbit_c2w  # noqa: F401  (public here: turntables, demos, tests)


@dataclass
class CameraBatch:
    c2w: torch.Tensor            # (B, 4, 4) camera-to-world, OpenGL convention
    fx: torch.Tensor             # (B,) focal lengths and principal point, in pixels
    fy: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    width: int
    height: int
    elevation_deg: torch.Tensor  # (B,) where the camera is, for view-dependent prompts
    azimuth_deg: torch.Tensor
    distance: torch.Tensor
    light_position: torch.Tensor   # (B, 3) point light, world space
    light_intensity: torch.Tensor  # (B,)
    ambient: torch.Tensor          # (B,)

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def position(self) -> torch.Tensor:
        return self.c2w[:, :3, 3]

    def to(self, device) -> "CameraBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return CameraBatch(**moved)

    def __getitem__(self, index) -> "CameraBatch":
        if isinstance(index, int):
            index = slice(index, index + 1)
        picked = {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return CameraBatch(**picked)

    def with_resolution(self, width: int, height: int) -> "CameraBatch":
        """The same cameras rendered at another image size (intrinsics scaled)."""
        sx, sy = width / self.width, height / self.height
        return replace(self, fx=self.fx * sx, fy=self.fy * sy, cx=self.cx * sx, cy=self.cy * sy, width=width, height=height)


@dataclass
class CameraSamplerConfig:
    elevation_range: Tuple[float, float] = (-10.0, 90.0)
    azimuth_range: Tuple[float, float] = (0.0, 360.0)
    distance_range: Tuple[float, float] = (1.0, 1.5)       # times the scene radius
    focal_range: Tuple[float, float] = (0.7, 1.35)          # focal length = multiplier * image height
    light_distance_range: Tuple[float, float] = (0.8, 1.5)  # times the scene radius
    light_position_perturb: float = 1.0                      # std of the jitter of the light around the camera direction
    # The diffuse light is drawn in light_intensity_range and then scaled by (1 - ambient), so that
    # ambient + diffuse <= 1 and lit albedo never exceeds 1: stable-dreamfusion's
    # ``ratio + (1 - ratio) * lambertian`` (nerf/renderer.py) and threestudio's ambient 0.1 + diffuse 0.9
    # (``materials/diffuse_with_point_light_material.py``) cap the light the same way.
    light_intensity_range: Tuple[float, float] = (0.7, 1.0)
    ambient_range: Tuple[float, float] = (0.1, 0.4)
    # Camera jitter (std of Gaussian perturbations): the position and the look-at target in scene radii,
    # the up vector in its own units. Off by default, as the paper and stable-dreamfusion (--jitter_pose);
    # threestudio's random camera uses camera_perturb 0.1, center_perturb 0.2, up_perturb 0.02.
    position_jitter: float = 0.0
    target_jitter: float = 0.0
    up_jitter: float = 0.0
    # Progressive view range (threestudio's random camera ``progressive_until``): over the first
    # ``progressive_until`` of the run (a fraction of the steps; threestudio counts steps) the azimuth range
    # widens linearly from the front (azimuth 0) and the elevation range from ``progressive_elevation``
    # (threestudio's ``eval_elevation_deg``, 15) to the full ranges above. 0 (off) by default, as threestudio's
    # ``progressive_until: 0``; stable-dreamfusion has no such schedule.
    progressive_until: float = 0.0
    progressive_elevation: float = 15.0


def view_ranges(config: CameraSamplerConfig, progress: float = 1.0) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """(elevation_range, azimuth_range) in degrees at this training progress in [0, 1] (see
    ``CameraSamplerConfig.progressive_until``). While the range widens, the azimuth range is taken around the
    front: a full circle as (-180, 180), a partial one shifted by whole turns to have its middle in [-180, 180]."""
    until = float(config.progressive_until)
    if until <= 0:
        return tuple(config.elevation_range), tuple(config.azimuth_range)
    r = min(max(float(progress), 0.0) / until, 1.0)
    lo, hi = (float(v) for v in config.azimuth_range)
    if hi - lo >= 360.0:
        lo, hi = -180.0, 180.0
    else:
        turns = 360.0 * math.floor((lo + hi) / 2 / 360.0 + 0.5)
        lo, hi = lo - turns, hi - turns
    e0 = float(config.progressive_elevation)
    elevation = tuple((1.0 - r) * e0 + r * float(v) for v in config.elevation_range)
    return elevation, (r * lo, r * hi)


def spherical_position(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    e, a = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    return torch.stack([torch.cos(e) * torch.sin(a), torch.sin(e), torch.cos(e) * torch.cos(a)], dim=-1) * distance[..., None]


def look_at(position: torch.Tensor, target: torch.Tensor, up=(0.0, 1.0, 0.0)) -> torch.Tensor:
    """(B,3) positions looking at (B,3) targets -> (B,4,4) OpenGL camera-to-world; ``up`` is (3,) or (B,3)."""
    forward = torch.nn.functional.normalize(target - position, dim=-1)
    up_t = torch.as_tensor(up, dtype=position.dtype, device=position.device).expand_as(forward)
    right = torch.cross(forward, up_t, dim=-1)
    degenerate = torch.linalg.vector_norm(right, dim=-1, keepdim=True) < 1e-6
    alt = torch.tensor((0.0, 0.0, -1.0), dtype=position.dtype, device=position.device).expand_as(forward)
    right = torch.where(degenerate, torch.cross(forward, alt, dim=-1), right)
    right = torch.nn.functional.normalize(right, dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(position.shape[:-1] + (4, 4), dtype=position.dtype, device=position.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = right, true_up, -forward, position
    c2w[..., 3, 3] = 1.0
    return c2w


@functools.lru_cache(maxsize=64)
def _uniform_ranges(ranges: Tuple[Tuple[float, float], ...], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lows, spans), each (K, 1), of K uniform draws on device; cached: a run asks for the same ranges every step."""
    lo_hi = torch.tensor(ranges, dtype=torch.float32)
    return lo_hi[:, :1].to(device), (lo_hi[:, 1:] - lo_hi[:, :1]).to(device)


def sample_cameras(batch_size: int, width: int, height: int, scene_radius: float = 1.0,
                   config: Optional[CameraSamplerConfig] = None, generator: Optional[torch.Generator] = None,
                   device="cpu", progress: float = 1.0) -> CameraBatch:
    """DreamFusion's random training cameras and point lights; ``progress`` (in [0, 1]) sets the view range
    when it widens over training (``CameraSamplerConfig.progressive_until``).

    This runs every training step, so it is kept to a few ops: the draws, then one `ops.orbit_cameras` pass
    that scales the seven uniform parameters to their ranges and builds the poses and lights. They are drawn
    as (4, B) and (3, B) blocks around the Gaussian draws, the order in which they were once drawn one
    parameter at a time, so that a seed gives the cameras it always gave."""
    cfg = config or CameraSamplerConfig()
    check(batch_size >= 1 and width >= 1 and height >= 1, "sample_cameras: batch size and image size must be positive")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    elevation_range, azimuth_range = view_ranges(cfg, progress)
    scaled = lambda lo_hi, s: (float(lo_hi[0]) * s, float(lo_hi[1]) * s)  # noqa: E731
    ranges = (scaled(elevation_range, 1.0), scaled(azimuth_range, 1.0), scaled(cfg.distance_range, scene_radius),
              scaled(cfg.focal_range, height), scaled(cfg.light_distance_range, scene_radius),
              scaled(cfg.light_intensity_range, 1.0), scaled(cfg.ambient_range, 1.0))
    jittered = cfg.position_jitter > 0 or cfg.target_jitter > 0 or cfg.up_jitter > 0
    draw = dict(generator=generator, device=gen_device)
    camera_u = torch.rand(4, batch_size, **draw)
    pose_noise = [torch.randn(batch_size, 3, **draw) for _ in range(3)] if jittered else None
    light_noise = torch.randn(batch_size, 3, **draw)
    light_u = torch.rand(3, batch_size, **draw)
    lows, spans = _uniform_ranges(ranges, gen_device)
    c2w, *fields = ops.orbit_cameras(camera_u, light_u, light_noise, lows=lows, spans=spans, width=width, height=height,
                                     light_perturb=cfg.light_position_perturb,
                                     wrap_azimuth=ranges[1][0] < 0.0 or ranges[1][1] > 360.0)
    if jittered:  # the light stays where the unjittered camera put it
        c2w = _jittered(c2w, cfg, scene_radius, pose_noise)
    fx, fy, cx, cy, elevation, azimuth, distance, light_position, light_intensity, ambient = fields
    cams = CameraBatch(c2w=c2w, fx=fx, fy=fy, cx=cx, cy=cy, width=width, height=height, elevation_deg=elevation,
                       azimuth_deg=azimuth, distance=distance, light_position=light_position,
                       light_intensity=light_intensity, ambient=ambient)
    return cams.to(device)


def _jittered(c2w: torch.Tensor, cfg: CameraSamplerConfig, scene_radius: float, noise) -> torch.Tensor:
    """threestudio's camera perturbation: jitter the position, the look-at target and the up vector by the
    three standard-normal (B, 3) ``noise`` draws."""
    position = c2w[:, :3, 3] + noise[0] * cfg.position_jitter * scene_radius
    target = noise[1] * cfg.target_jitter * scene_radius
    up = c2w[:, :3, 1] + noise[2] * cfg.up_jitter
    return look_at(position, target, up)


def orbit_cameras(n_views: int, width: int, height: int, elevation_deg: float = 15.0, distance: float = 1.5,
                  fov_y_deg: float = 50.0, start_azimuth_deg: float = 0.0, light_intensity: float = 0.8,
                  ambient: float = 0.2, device="cpu") -> CameraBatch:
    """Evenly spaced azimuths at a fixed elevation (turntables, previews, evaluation); the light follows the camera."""
    azimuth = (start_azimuth_deg + torch.arange(n_views, dtype=torch.float32) * 360.0 / n_views) % 360.0
    elevation = torch.full((n_views,), float(elevation_deg))
    dist = torch.full((n_views,), float(distance))
    c2w = orbit_c2w(elevation, azimuth, dist)
    focal = torch.full((n_views,), 0.5 * height / math.tan(math.radians(fov_y_deg) / 2))
    cams = CameraBatch(
        c2w=c2w, fx=focal, fy=focal.clone(), cx=torch.full_like(focal, width / 2), cy=torch.full_like(focal, height / 2),
        width=width, height=height, elevation_deg=elevation, azimuth_deg=azimuth, distance=dist,
        light_position=c2w[:, :3, 3] * 1.2, light_intensity=torch.full((n_views,), light_intensity),
        ambient=torch.full((n_views,), ambient),
    )
    return cams.to(device)


def pixel_rays(cameras: CameraBatch) -> Tuple[torch.Tensor, ...]:
    """One ray per pixel, flat (R = B*H*W, row-major per camera): origins, unit directions, light positions
    (R, 3) and light intensity, ambient (R,) of the pixel's camera, in one `ops.camera_rays` pass."""
    return ops.camera_rays(cameras.c2w, fx=cameras.fx, fy=cameras.fy, cx=cameras.cx, cy=cameras.cy,
                           light_position=cameras.light_position, light_intensity=cameras.light_intensity,
                           ambient=cameras.ambient, height=cameras.height, width=cameras.width)


def generate_rays(cameras: CameraBatch) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pinhole rays through pixel centres -> origins, unit directions, each (B, H, W, 3).

    Camera-space direction (u, -v, -1) (OpenGL: -z forward, +y up) with u = (x - cx) / fx, v = (y - cy) / fy
    at the pixel centre (x, y), rotated by the camera's c2w and normalised."""
    origins, directions = pixel_rays(cameras)[:2]
    shape = (len(cameras), cameras.height, cameras.width, 3)
    return origins.view(shape), directions.view(shape)


def cameras_from_poses(c2w: torch.Tensor, fx, fy, cx, cy, width: int, height: int) -> CameraBatch:
    """Cameras from given poses (posed-image data); angles are derived from the camera positions."""
    B = c2w.shape[0]
    as_vec = lambda v: torch.as_tensor(v, dtype=c2w.dtype).reshape(-1).expand(B).clone()  # noqa: E731
    pos = c2w[:, :3, 3]
    distance = torch.linalg.vector_norm(pos, dim=-1)
    elevation = torch.rad2deg(torch.asin((pos[:, 1] / distance.clamp_min(1e-8)).clamp(-1, 1)))
    azimuth = torch.rad2deg(torch.atan2(pos[:, 0], pos[:, 2])) % 360.0
    return CameraBatch(c2w=c2w, fx=as_vec(fx), fy=as_vec(fy), cx=as_vec(cx), cy=as_vec(cy), width=width, height=height,
                       elevation_deg=elevation, azimuth_deg=azimuth, distance=distance, light_position=pos * 1.2,
                       light_intensity=torch.full((B,), 0.8, dtype=c2w.dtype), ambient=torch.full((B,), 0.2, dtype=c2w.dtype))
