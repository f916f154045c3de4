"""Camera geometry: DreamFusion's orbit cameras from their random draws, and pinhole rays through pixel centres.

World is y-up; camera frames follow OpenGL (the camera looks down -z, +y is up in the image). These are the
PyTorch twins of the native ops `orbit_cameras` and `camera_rays` (the fallback and the oracle); the
conventions are described in `fastdream.cameras`.
"""
from __future__ import annotations

import functools

import torch

from ..errors import check


def orbit_c2w(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Cameras on a sphere looking at the origin. The image x-axis is the horizontal tangent of the orbit,
    so the frame stays well defined straight overhead (where a look-at with a fixed up vector degenerates).

    With e, a the elevation and azimuth the columns are right = (cos a, 0, -sin a), up = (-sin e sin a, cos e,
    -sin e cos a), back = (cos e sin a, sin e, cos e cos a) (the unit vector toward the camera) and the position
    distance * back."""
    angles = torch.deg2rad(torch.stack([elevation_deg, azimuth_deg], dim=-1))
    (sin_e, sin_a), (cos_e, cos_a) = angles.sin().unbind(-1), angles.cos().unbind(-1)
    zero, one, minus_sin_e = torch.zeros_like(sin_e), torch.ones_like(sin_e), -sin_e
    back_x, back_z = cos_e * sin_a, cos_e * cos_a
    c2w = torch.stack([cos_a, minus_sin_e * sin_a, back_x, back_x * distance,
                       zero, cos_e, sin_e, sin_e * distance,
                       -sin_a, minus_sin_e * cos_a, back_z, back_z * distance,
                       zero, zero, zero, one], dim=-1)
    return c2w.view(c2w.shape[:-1] + (4, 4))


def check_orbit_inputs(camera_u, light_u, light_noise, lows, spans) -> None:
    check(camera_u.dim() == 2 and camera_u.shape[0] == 4 and camera_u.dtype in (torch.float32, torch.float64),
          f"orbit_cameras: camera_u must be a (4, B) float32/float64 tensor, got {tuple(camera_u.shape)} {camera_u.dtype}")
    B = camera_u.shape[1]
    check(light_u.shape == (3, B), f"orbit_cameras: light_u must be (3, {B}), got {tuple(light_u.shape)}")
    check(light_noise.shape == (B, 3), f"orbit_cameras: light_noise must be ({B}, 3), got {tuple(light_noise.shape)}")
    check(lows.numel() == 7 and spans.numel() == 7,
          f"orbit_cameras: lows and spans need 7 values, got {lows.numel()} and {spans.numel()}")


def orbit_cameras_reference(camera_u, light_u, light_noise, lows, spans, width: int, height: int,
                            light_perturb: float = 1.0, wrap_azimuth: bool = False):
    """Orbit cameras and point lights from their draws. camera_u (4, B) uniform in [0, 1) (elevation, azimuth,
    distance, focal), light_u (3, B) (light distance, intensity, ambient), scaled to low + u * span by lows and
    spans (7 values each); light_noise (B, 3) standard normal. The light sits at the light distance along the
    unit direction toward the camera jittered by light_perturb * noise; its intensity is the diffuse share,
    intensity * max(1 - ambient, 0). wrap_azimuth: azimuth % 360. Returns a CameraBatch's tensors: (c2w
    (B, 4, 4), fx, fy, cx, cy, elevation, azimuth, distance (B,), light_position (B, 3), light_intensity,
    ambient (B,)), in camera_u's dtype."""
    check_orbit_inputs(camera_u, light_u, light_noise, lows, spans)
    dt = camera_u.dtype
    u = torch.cat([camera_u, light_u.to(dt)])
    elevation, azimuth, distance, focal, light_distance, intensity, ambient = torch.addcmul(
        lows.to(dt).reshape(7, 1), u, spans.to(dt).reshape(7, 1)).unbind(0)
    if wrap_azimuth:
        azimuth = azimuth % 360.0
    c2w = orbit_c2w(elevation, azimuth, distance)
    direction = c2w[:, :3, 2] + light_noise.to(dt) * light_perturb
    light_position = torch.nn.functional.normalize(direction, dim=-1) * light_distance[:, None]
    diffuse = intensity * (1.0 - ambient).clamp_min(0.0)
    return (c2w, focal, focal.clone(), torch.full_like(focal, width / 2), torch.full_like(focal, height / 2),
            elevation, azimuth, distance, light_position, diffuse, ambient)


@functools.lru_cache(maxsize=32)
def _pixel_centres(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H*W, 2) pixel centres (x + 0.5, y + 0.5), row-major; cached: every render of a size shares them."""
    j, i = torch.meshgrid(torch.arange(height, device=device, dtype=dtype), torch.arange(width, device=device, dtype=dtype),
                          indexing="ij")
    return torch.stack([i, j], dim=-1).reshape(-1, 2) + 0.5


def check_camera_rays_inputs(c2w, fx, fy, cx, cy, light_position, light_intensity, ambient, height, width) -> None:
    check(c2w.dim() == 3 and c2w.shape[1:] == (4, 4) and c2w.is_floating_point(),
          f"camera_rays: c2w must be a (B, 4, 4) floating tensor, got {tuple(c2w.shape)} {c2w.dtype}")
    B = c2w.shape[0]
    for name, t in (("fx", fx), ("fy", fy), ("cx", cx), ("cy", cy), ("light_intensity", light_intensity),
                    ("ambient", ambient)):
        check(t.numel() == B, f"camera_rays: {name} needs one value per camera ({B}), got shape {tuple(t.shape)}")
    check(light_position.numel() == 3 * B, f"camera_rays: light_position must be ({B}, 3), got {tuple(light_position.shape)}")
    check(height >= 0 and width >= 0, f"camera_rays: height and width must be >= 0, got {height} and {width}")


def camera_rays_reference(c2w, fx, fy, cx, cy, light_position, light_intensity, ambient, height: int, width: int):
    """Pinhole rays through pixel centres and the lights of their cameras, per pixel, flat: R = B * height *
    width rays, row-major per camera. Camera-space direction (u, -v, -1) with u = (x + 0.5 - cx) / fx,
    v = (y + 0.5 - cy) / fy, rotated by c2w as right * u + up * (-v) - back and normalised. Returns (origins,
    directions, light_positions (R, 3), light_intensity, ambient (R,)) in c2w's dtype."""
    check_camera_rays_inputs(c2w, fx, fy, cx, cy, light_position, light_intensity, ambient, height, width)
    B, dt = c2w.shape[0], c2w.dtype
    per_camera = lambda v: v.to(dt).reshape(B)  # noqa: E731
    centres = _pixel_centres(height, width, c2w.device, dt)
    principal = torch.stack([per_camera(cx), per_camera(cy)], dim=-1)[:, None, :]     # (B, 1, 2)
    scale = torch.stack([per_camera(fx), -per_camera(fy)], dim=-1)[:, None, :]        # (B, 1, 2)
    uv = (centres - principal) / scale                                                # (B, H*W, 2): (u, -v)
    dirs = torch.baddbmm(-c2w[:, None, :3, 2], uv, c2w[:, :3, :2].transpose(1, 2))   # (B, H*W, 3)
    dirs = torch.nn.functional.normalize(dirs, dim=-1).reshape(-1, 3)
    n = height * width
    origins = c2w[:, None, :3, 3].expand(B, n, 3).reshape(-1, 3)
    lights = light_position.to(dt).reshape(B, 1, 3).expand(B, n, 3).reshape(-1, 3)
    per_ray = lambda v: per_camera(v)[:, None].expand(B, n).reshape(-1)  # noqa: E731
    return origins, dirs, lights, per_ray(light_intensity), per_ray(ambient)
