"""A small synthetic scene built in code: the ground truth for `fastdream fit --demo` and a reference
scene for later guidance tests.

The scene is a voxel grid (density and albedo, indexed [x, y, z] over an axis-aligned box, voxel
centres at aabb_min + (i + 0.5) / D * size, like the occupancy grid's cells) holding two spheres and a
box of different colours, with soft surfaces a couple of voxels thick so it can be resampled smoothly.
Its views are rendered by `render_voxels`, a deliberately independent volume renderer (dense uniform
samples, trilinear lookups with `grid_sample`, cumprod compositing); it shares no code with
fastdream.ops, so fitting the engine to its images checks the engine against something else.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DEMO_AABB = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)


def _sdf_sphere(p: torch.Tensor, centre, radius: float) -> torch.Tensor:
    return torch.linalg.vector_norm(p - torch.tensor(centre, dtype=p.dtype), dim=-1) - radius


def _sdf_box(p: torch.Tensor, centre, half) -> torch.Tensor:
    q = (p - torch.tensor(centre, dtype=p.dtype)).abs() - torch.tensor(half, dtype=p.dtype)
    outside = torch.linalg.vector_norm(q.clamp_min(0.0), dim=-1)
    inside = q.max(dim=-1).values.clamp_max(0.0)
    return outside + inside


def demo_scene(resolution: int = 64, peak_density: float = 60.0) -> Dict[str, np.ndarray]:
    """The demo scene as voxel arrays: density (D,D,D) float32 >= 0, albedo (D,D,D,3) in [0,1], aabb (6,)."""
    D = int(resolution)
    aabb = np.asarray(DEMO_AABB, dtype=np.float32)
    coords = (torch.arange(D, dtype=torch.float32) + 0.5) / D * 2.0 - 1.0  # box is [-1, 1]^3
    p = torch.stack(torch.meshgrid(coords, coords, coords, indexing="ij"), dim=-1)  # (D,D,D,3), [x,y,z]
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    sdfs = torch.stack([
        _sdf_sphere(p, (-0.35, -0.15, 0.1), 0.35),
        _sdf_box(p, (0.35, -0.2, -0.15), (0.2, 0.3, 0.2)),
        _sdf_sphere(p, (0.1, 0.4, 0.2), 0.22),
    ])
    albedos = torch.stack([
        # orange-red sphere, lighter towards the top
        torch.stack([0.85 + 0.1 * y, 0.25 + 0.3 * (y + 0.5).clamp(0, 1), 0.15 + 0.0 * y], dim=-1),
        # blue box with two soft horizontal bands
        torch.stack([0.15 + 0.0 * y, 0.3 + 0.25 * (0.5 + 0.5 * torch.cos(6.0 * y)), 0.8 + 0.0 * y], dim=-1),
        # green-yellow sphere, shading left to right
        torch.stack([0.35 + 0.4 * (x + 0.2).clamp(0, 0.6), 0.8 + 0.0 * x, 0.25 + 0.2 * z], dim=-1),
    ]).clamp(0.0, 1.0)
    sdf, which = sdfs.min(dim=0)
    voxel = 2.0 / D
    width = 1.5 * voxel
    occupancy = (0.5 - sdf / width).clamp(0.0, 1.0)
    density = peak_density * occupancy
    # Albedo of the nearest object everywhere, so interpolation near surfaces never blends towards black.
    albedo = torch.gather(albedos, 0, which[None, ..., None].expand(1, D, D, D, 3))[0]
    return {"density": density.numpy().astype(np.float32), "albedo": albedo.numpy().astype(np.float32), "aabb": aabb}


def save_demo_scene(path, resolution: int = 64) -> Path:
    """Write the demo scene as an .npz with keys density, albedo, aabb."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = demo_scene(resolution)
    with open(path, "wb") as f:
        np.savez_compressed(f, **scene)
    return path


def load_scene_npz(path) -> Dict[str, np.ndarray]:
    """Read a scene written by save_demo_scene (density (D,D,D), albedo (D,D,D,3), aabb (6,))."""
    from .errors import FastDreamError

    path = Path(path)
    try:
        with np.load(path) as data:
            scene = {k: np.asarray(data[k], dtype=np.float32) for k in ("density", "albedo", "aabb")}
    except FileNotFoundError:
        raise FastDreamError(f"Scene file {path} does not exist.") from None
    except KeyError as exc:
        raise FastDreamError(f"Scene file {path} lacks the array {exc}; it needs density, albedo and aabb.") from None
    except Exception as exc:
        raise FastDreamError(f"Scene file {path} could not be read as an .npz ({type(exc).__name__}: {exc}).") from None
    d, a, box = scene["density"], scene["albedo"], scene["aabb"]
    if d.ndim != 3 or a.shape != d.shape + (3,) or box.shape != (6,):
        raise FastDreamError(f"Scene file {path} has density {d.shape}, albedo {a.shape}, aabb {box.shape}; "
                             "expected (X,Y,Z), (X,Y,Z,3) and (6,).")
    return scene


def voxel_volume(density: torch.Tensor, albedo: torch.Tensor) -> torch.Tensor:
    """density (D,D,D) and albedo (D,D,D,3), indexed [x, y, z] -> the (1, 4, Z, Y, X) volume grid_sample wants."""
    return torch.cat([density[None], albedo.permute(3, 0, 1, 2)], dim=0).permute(0, 3, 2, 1)[None]


def sample_volume(volume: torch.Tensor, aabb: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear values (N, C) of a (1, C, Z, Y, X) volume filling the box aabb (6,) at world points (N, 3);
    zero outside the box. grid_sample takes (x, y, z) in [-1, 1]; align_corners=False puts samples at voxel centres."""
    unit = (points.to(volume.dtype) - aabb[:3]) / (aabb[3:] - aabb[:3]) * 2.0 - 1.0
    out = F.grid_sample(volume, unit.reshape(1, -1, 1, 1, 3), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(volume.shape[1], -1).T


def sample_voxels(scene: Dict[str, np.ndarray], points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Trilinear density (N,) and albedo (N,3) of a voxel scene at world points (N,3); zero outside the box."""
    density = torch.as_tensor(scene["density"], dtype=torch.float32)
    albedo = torch.as_tensor(scene["albedo"], dtype=torch.float32)
    aabb = torch.as_tensor(scene["aabb"], dtype=torch.float32)
    out = sample_volume(voxel_volume(density, albedo), aabb, points)
    return out[:, 0].clamp_min(0.0), out[:, 1:].clamp(0.0, 1.0)


def render_voxels(scene: Dict[str, np.ndarray], c2w: torch.Tensor, focal: float, width: int, height: int,
                  n_samples: int = 384, chunk: int = 8192) -> Tuple[torch.Tensor, torch.Tensor]:
    """Render a voxel scene from OpenGL cameras c2w (B,4,4) with a pinhole of the given focal length (pixels,
    principal point at the image centre). Returns premultiplied rgb (B,H,W,3) and alpha (B,H,W,1)."""
    aabb = torch.as_tensor(scene["aabb"], dtype=torch.float32)
    B = c2w.shape[0]
    j, i = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    cam = torch.stack([(i + 0.5 - width / 2) / focal, -(j + 0.5 - height / 2) / focal, -torch.ones_like(i)], dim=-1)
    dirs = torch.einsum("bij,hwj->bhwi", c2w[:, :3, :3].float(), cam)
    dirs = dirs / torch.linalg.vector_norm(dirs, dim=-1, keepdim=True)
    origins = c2w[:, None, None, :3, 3].float().expand_as(dirs)
    dirs, origins = dirs.reshape(-1, 3), origins.reshape(-1, 3)
    rgb_out, alpha_out = [], []
    for start in range(0, dirs.shape[0], chunk):
        o, d = origins[start:start + chunk], dirs[start:start + chunk]
        inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
        t0, t1 = (aabb[:3] - o) * inv, (aabb[3:] - o) * inv
        near = torch.minimum(t0, t1).max(dim=-1).values.clamp_min(0.0)
        far = torch.maximum(t0, t1).min(dim=-1).values
        hit = far > near
        far = torch.where(hit, far, near)
        u = (torch.arange(n_samples, dtype=torch.float32) + 0.5) / n_samples
        t = near[:, None] + (far - near)[:, None] * u[None]  # (R,S) interval midpoints
        dt = ((far - near) / n_samples)[:, None]
        pts = o[:, None, :] + d[:, None, :] * t[..., None]
        sigma, albedo = sample_voxels(scene, pts.reshape(-1, 3))
        sigma, albedo = sigma.reshape(t.shape), albedo.reshape(t.shape + (3,))
        alpha = 1.0 - torch.exp(-sigma * dt)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], dim=1), dim=1)[:, :-1]
        w = alpha * trans
        rgb_out.append((w[..., None] * albedo).sum(dim=1))
        alpha_out.append(w.sum(dim=1, keepdim=True))
    rgb = torch.cat(rgb_out).reshape(B, height, width, 3)
    alpha = torch.cat(alpha_out).reshape(B, height, width, 1).clamp(0.0, 1.0)
    return rgb, alpha


def demo_cameras(n_train: int = 32, n_test: int = 8, distance: float = 2.7) -> Tuple[torch.Tensor, torch.Tensor]:
    """Camera-to-world matrices (OpenGL) around the demo scene: training views on a spiral covering elevations
    -20..70 degrees, test views at azimuths and elevations in between (never a training pose)."""
    from .cameras import orbit_c2w

    golden = 180.0 * (3.0 - math.sqrt(5.0))  # golden angle, degrees

    def spiral(k: torch.Tensor):
        elevation = -20.0 + 90.0 * k / n_train
        azimuth = (k * golden) % 360.0
        return orbit_c2w(elevation, azimuth, torch.full(k.shape, float(distance)))

    train_k = torch.arange(n_train, dtype=torch.float32)
    test_k = (torch.arange(n_test, dtype=torch.float32) + 0.5) * n_train / max(n_test, 1)
    return spiral(train_k), spiral(test_k)


def write_demo_dataset(folder, width: int = 48, n_train: int = 32, n_test: int = 8, fov_deg: float = 40.0,
                       resolution: int = 64) -> Path:
    """Render the demo scene and write it as a NeRF-synthetic folder: transforms_train.json, transforms_test.json,
    train/r_*.png and test/r_*.png (RGBA, straight alpha). Returns the folder."""
    from PIL import Image

    folder = Path(folder)
    scene = demo_scene(resolution)
    train_c2w, test_c2w = demo_cameras(n_train, n_test)
    angle_x = math.radians(fov_deg)
    focal = 0.5 * width / math.tan(0.5 * angle_x)
    for split, c2w in (("train", train_c2w), ("test", test_c2w)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        rgb, alpha = render_voxels(scene, c2w, focal, width, width)
        straight = torch.where(alpha > 1e-6, rgb / alpha.clamp_min(1e-6), torch.zeros_like(rgb)).clamp(0.0, 1.0)
        rgba = torch.cat([straight, alpha], dim=-1)
        frames = []
        for k in range(c2w.shape[0]):
            pixels = (rgba[k].numpy() * 255.0 + 0.5).astype(np.uint8)
            Image.fromarray(pixels, mode="RGBA").save(folder / split / f"r_{k}.png")
            frames.append({"file_path": f"./{split}/r_{k}", "transform_matrix": c2w[k].tolist()})
        with open(folder / f"transforms_{split}.json", "w") as f:
            # "aabb" is a fastdream extension (other tools ignore it): the exact scene box.
            json.dump({"camera_angle_x": angle_x, "aabb": [list(DEMO_AABB[:3]), list(DEMO_AABB[3:])], "frames": frames}, f, indent=1)
    return folder
