"""Volume renderer: cameras -> rays -> occupancy-grid marching -> field queries -> fused shading + compositing.

Sampling follows nerfacc: march through occupied cells, evaluate density once without gradients to drop
samples behind opaque surfaces (transmittance < early_stop_eps) or nearly transparent ones (alpha <
alpha_threshold), then query the field with gradients only for the samples that remain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import ops
from .cameras import CameraBatch, generate_rays
from .errors import check
from .field import BackgroundModel, HashGridField
from .occupancy import OccupancyGrid


@dataclass
class RenderConfig:
    samples_per_ray: int = 512       # step size = box diagonal / samples_per_ray
    cone_angle: float = 0.0          # > 0 grows steps with distance (large scenes)
    near: float = 0.0
    far: float = 1e10
    early_stop_eps: float = 1e-4
    alpha_threshold: float = 0.0
    chunk_rays: int = 2**13          # rays per chunk when rendering without gradients (bounds memory)
    chunk_samples: int = 2**19       # samples per density query in the gradient-free pruning pass (bounds memory)


@dataclass
class RayOutput:
    rgb: torch.Tensor         # (R,3), composited over the background
    opacity: torch.Tensor     # (R,1)
    depth: torch.Tensor       # (R,1)
    normal: torch.Tensor      # (R,3) accumulated world-space normal (zero in albedo mode without normals)
    # per-sample data, for regularisers
    weights: torch.Tensor     # (N,)
    ray_indices: torch.Tensor
    sample_normals: Optional[torch.Tensor]
    directions: torch.Tensor  # (R,3)


@dataclass
class RenderOutput:
    rgb: torch.Tensor         # (B,H,W,3)
    opacity: torch.Tensor     # (B,H,W,1)
    depth: torch.Tensor       # (B,H,W,1)
    normal: torch.Tensor      # (B,H,W,3)
    rays: Optional[RayOutput] = None
    n_samples: int = 0


class Renderer(nn.Module):
    def __init__(self, field: HashGridField, background: BackgroundModel, grid: OccupancyGrid, config: Optional[RenderConfig] = None):
        super().__init__()
        self.field, self.background, self.grid = field, background, grid
        self.config = config or RenderConfig()

    @property
    def step_size(self) -> float:
        size = self.field.aabb[3:] - self.field.aabb[:3]
        return float(torch.linalg.vector_norm(size)) / self.config.samples_per_ray

    def sample(self, origins: torch.Tensor, directions: torch.Tensor):
        cfg = self.config
        ray_indices, t_starts, t_ends = self.grid.march(origins, directions, cfg.near, cfg.far, self.step_size, cfg.cone_angle)
        if ray_indices.numel() > 0 and (cfg.early_stop_eps > 0 or cfg.alpha_threshold > 0):
            with torch.no_grad():
                mid = origins[ray_indices] + directions[ray_indices] * ((t_starts + t_ends) * 0.5)[:, None]
                sigmas = torch.cat([self.field.density(part) for part in mid.split(cfg.chunk_samples)])
                _, trans, alphas = ops.render_weights(t_starts, t_ends, sigmas, ray_indices=ray_indices,
                                                        n_rays=origins.shape[0])
                keep = (trans >= cfg.early_stop_eps) & (alphas >= cfg.alpha_threshold)
            ray_indices, t_starts, t_ends = ray_indices[keep], t_starts[keep], t_ends[keep]
        return ray_indices, t_starts, t_ends

    def render_rays(self, origins: torch.Tensor, directions: torch.Tensor, shading: str = "albedo",
                    light_positions: Optional[torch.Tensor] = None, light_intensity: Optional[torch.Tensor] = None,
                    ambient: Optional[torch.Tensor] = None, need_normals: bool = False,
                    background: Optional[torch.Tensor] = None) -> RayOutput:
        """Render R rays. Light tensors are per ray; background overrides the background model with (R,3) or (3,)."""
        ops.shading_code(shading)
        check(origins.dim() == 2 and origins.shape[1] == 3 and directions.shape == origins.shape,
              f"render_rays: origins and directions must both be (R, 3), got {tuple(origins.shape)} and {tuple(directions.shape)}")
        n_rays = origins.shape[0]
        need_normals = need_normals or shading != "albedo"
        if light_positions is None:
            light_positions = origins
        if light_intensity is None:
            light_intensity = origins.new_ones(n_rays)
        if ambient is None:
            ambient = origins.new_zeros(n_rays)
        ray_indices, t_starts, t_ends = self.sample(origins, directions)
        mid = origins[ray_indices] + directions[ray_indices] * ((t_starts + t_ends) * 0.5)[:, None]
        sigmas, albedo, normals = self.field.query(mid, need_normals=need_normals)
        rgb, opacity, depth, normal, weights = ops.composite(
            t_starts, t_ends, sigmas, albedo, normals, ray_indices=ray_indices, n_rays=n_rays, origins=origins,
            directions=directions, light_positions=light_positions, light_intensity=light_intensity, ambient=ambient,
            mode=shading)
        bg = self.background(directions) if background is None else torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device).expand(n_rays, 3)
        rgb = rgb + (1.0 - opacity) * bg
        return RayOutput(rgb=rgb, opacity=opacity, depth=depth, normal=normal, weights=weights,
                         ray_indices=ray_indices, sample_normals=normals, directions=directions)

    def render(self, cameras: CameraBatch, shading: str = "albedo", need_normals: bool = False,
               background: Optional[torch.Tensor] = None) -> RenderOutput:
        """Render whole images. With gradients enabled all rays go in one batch (training); without,
        in chunks of config.chunk_rays (previews, export, evaluation)."""
        origins, directions = generate_rays(cameras)
        B, H, W = len(cameras), cameras.height, cameras.width
        per_ray = lambda v: v[:, None].expand(B, H * W).reshape(-1)  # noqa: E731
        args = dict(
            origins=origins.reshape(-1, 3), directions=directions.reshape(-1, 3),
            light_positions=cameras.light_position[:, None, :].expand(B, H * W, 3).reshape(-1, 3),
            light_intensity=per_ray(cameras.light_intensity), ambient=per_ray(cameras.ambient),
        )
        if torch.is_grad_enabled():
            out = self.render_rays(shading=shading, need_normals=need_normals, background=background, **args)
            parts, n_samples, rays = [out], out.weights.shape[0], out
        else:
            parts, n_samples, rays = [], 0, None
            chunk = self.config.chunk_rays
            for start in range(0, B * H * W, chunk):
                sl = {k: v[start:start + chunk] for k, v in args.items()}
                out = self.render_rays(shading=shading, need_normals=need_normals, background=background, **sl)
                parts.append(out)
                n_samples += out.weights.shape[0]
        cat = lambda name, c: torch.cat([getattr(p, name) for p in parts]).reshape(B, H, W, c)  # noqa: E731
        return RenderOutput(rgb=cat("rgb", 3), opacity=cat("opacity", 1), depth=cat("depth", 1), normal=cat("normal", 3),
                            rays=rays, n_samples=n_samples)


def build_renderer(aabb=(-1.0, -1.0, -1.0, 1.0, 1.0, 1.0), field_config=None, render_config=None,
                   background: str = "mlp", background_color=(1.0, 1.0, 1.0), grid_resolution: int = 64,
                   grid_kwargs: Optional[dict] = None) -> Renderer:
    field = HashGridField(aabb, field_config)
    bg = BackgroundModel(background, background_color)
    grid = OccupancyGrid(aabb, resolution=grid_resolution, **(grid_kwargs or {}))
    return Renderer(field, bg, grid, render_config)
