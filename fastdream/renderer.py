"""Volume renderer: cameras -> rays -> occupancy-grid marching -> field queries -> fused shading + compositing.

Sampling follows nerfacc: march through occupied cells, evaluate density once without gradients to drop
samples behind opaque surfaces (transmittance < early_stop_eps) or nearly transparent ones (alpha <
alpha_threshold), then query the field with gradients only for the samples that remain.

Inside ``with renderer.fixed_capacity():`` (the training step) every shape is static: the marcher writes
into a buffer sized on the host (`fastdream.sample_buffer`), the kept samples are compacted into a second
one by `ops.compact_visible_samples` (one native op: each ray walked until its transmittance falls below
early_stop_eps, its kept samples counted, scanned and written), and padding slots are zero-length
intervals (weight 0, no gradient). Nothing reads a device value on the host; the true totals are recorded
on the device for the training loop to check. Outside it (previews, export, evaluation) the
sample arrays are sized exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from contextlib import contextmanager
from typing import Optional, Union

import torch
from torch import nn

from . import ops
from .cameras import CameraBatch, pixel_rays
from .errors import check
from .field import BackgroundModel, HashGridField
from .occupancy import OccupancyGrid
from .regularizers import scale_gradients_near_camera
from .sample_buffer import SampleBuffer


@dataclass
class RenderConfig:
    samples_per_ray: int = 512       # step size = box diagonal / samples_per_ray
    cone_angle: float = 0.0          # > 0 grows steps with distance (large scenes)
    near: float = 0.0
    far: float = 1e10
    early_stop_eps: float = 1e-4
    alpha_threshold: float = 0.0
    chunk_rays: int = 2**13          # rays per chunk when rendering without gradients (bounds memory)
    # samples per density query in the gradient-free pruning pass (bounds memory): a training step's marched
    # samples (~1.6M at 64x64) in one query, whose transient memory stays below the step's gradient query
    chunk_samples: int = 2**21
    # The training step renders with static shapes into fixed-capacity sample buffers, with no host sync
    # (`Renderer.fixed_capacity`); false: sample arrays sized exactly, one host sync per render.
    fixed_capacity: bool = True
    # > 0: while training, the gradient of a sample at distance t from its ray's origin is scaled by
    # min(1, (t / near_gradient_distance)^2) (regularizers.scale_gradients_near_camera: against haze in front
    # of the cameras of real captures); 0: off.
    near_gradient_distance: float = 0.0


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
    t_starts: Optional[torch.Tensor] = None  # (N,) each sample's interval along its ray (distortion loss)
    t_ends: Optional[torch.Tensor] = None


@dataclass
class RenderOutput:
    rgb: torch.Tensor         # (B,H,W,3)
    opacity: torch.Tensor     # (B,H,W,1)
    depth: torch.Tensor       # (B,H,W,1)
    normal: torch.Tensor      # (B,H,W,3)
    rays: Optional[RayOutput] = None
    n_samples: Union[int, torch.Tensor] = 0  # kept samples; a 0-d device tensor under fixed_capacity()


class Renderer(nn.Module):
    def __init__(self, field: HashGridField, background: BackgroundModel, grid: OccupancyGrid, config: Optional[RenderConfig] = None):
        super().__init__()
        self.field, self.background, self.grid = field, background, grid
        self.config = config or RenderConfig()
        self.sample_buffer = SampleBuffer()
        self._fixed_capacity = False
        self._n_kept: Optional[torch.Tensor] = None  # device count of the last fixed-capacity sample()

    @contextmanager
    def fixed_capacity(self):
        """Render with static shapes and no host sync (see the module docstring); the totals go to
        `sample_buffer` for the caller to read back and `settle`."""
        previous, self._fixed_capacity = self._fixed_capacity, True
        try:
            yield self.sample_buffer
        finally:
            self._fixed_capacity = previous

    @property
    def step_size(self) -> float:
        diagonal = getattr(self.field, "diagonal", None)  # a host float on fastdream's fields (no device read)
        if diagonal is None:
            diagonal = float(torch.linalg.vector_norm(self.field.aabb[3:] - self.field.aabb[:3]))
        return diagonal / self.config.samples_per_ray

    @property
    def prunes(self) -> bool:
        return self.config.early_stop_eps > 0 or self.config.alpha_threshold > 0

    @torch.no_grad()
    def _densities(self, origins, directions, ray_indices, t_starts, t_ends) -> torch.Tensor:
        """The pruning pass's density query, without gradients, in chunks that bound its memory."""
        mid = ops.ray_points(t_starts, t_ends, ray_indices=ray_indices, origins=origins, directions=directions)
        chunk = self.config.chunk_samples
        parts = mid.split(chunk) if mid.shape[0] > chunk else [mid]
        return _joined([self.field.density(part) for part in parts])

    def _prune(self, origins, directions, ray_indices, t_starts, t_ends, n_marched, capacity: int):
        """Keep the samples still visible and not transparent (`ops.compact_visible_samples`), in `capacity`
        slots; returns them and the kept total (a 0-d device tensor)."""
        cfg = self.config
        sigmas = self._densities(origins, directions, ray_indices, t_starts, t_ends)
        return ops.compact_visible_samples(ray_indices, t_starts, t_ends, sigmas, n_samples=n_marched,
                                           n_rays=origins.shape[0], early_stop_eps=cfg.early_stop_eps,
                                           alpha_threshold=cfg.alpha_threshold, capacity=capacity)

    def sample(self, origins: torch.Tensor, directions: torch.Tensor):
        if self._fixed_capacity and origins.shape[0] > 0:
            if self.sample_buffer.calibrated:
                return self._sample_fixed(origins, directions)
            ray_indices, t_starts, t_ends, n_marched = self._sample_dynamic(origins, directions)
            self.sample_buffer.calibrate(n_marched, ray_indices.shape[0])
            self._n_kept = torch.tensor(ray_indices.shape[0], device=origins.device)
            return ray_indices, t_starts, t_ends
        return self._sample_dynamic(origins, directions)[:3]

    def _sample_dynamic(self, origins: torch.Tensor, directions: torch.Tensor):
        cfg = self.config
        ray_indices, t_starts, t_ends = self.grid.march(origins, directions, cfg.near, cfg.far, self.step_size, cfg.cone_angle)
        n_marched = ray_indices.shape[0]
        if n_marched > 0 and self.prunes:
            ray_indices, t_starts, t_ends, n_kept = self._prune(origins, directions, ray_indices, t_starts, t_ends,
                                                                None, capacity=n_marched)
            n = int(n_kept)  # the one host sync, to size the samples exactly
            ray_indices, t_starts, t_ends = ray_indices[:n], t_starts[:n], t_ends[:n]
        return ray_indices, t_starts, t_ends, n_marched

    def _sample_fixed(self, origins: torch.Tensor, directions: torch.Tensor):
        cfg, buf = self.config, self.sample_buffer
        ray_indices, t_starts, t_ends, n_marched = self.grid.march_fixed(
            origins, directions, cfg.near, cfg.far, self.step_size, cfg.cone_angle, capacity=buf.marched)
        n_kept = n_marched
        if self.prunes:
            ray_indices, t_starts, t_ends, n_kept = self._prune(origins, directions, ray_indices, t_starts, t_ends,
                                                                n_marched, capacity=buf.kept)
        buf.record(n_marched, n_kept)
        self._n_kept = n_kept
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
        mid = ops.ray_points(t_starts, t_ends, ray_indices=ray_indices, origins=origins, directions=directions)
        sigmas, albedo, normals = self.field.query(mid, need_normals=need_normals)
        if self.config.near_gradient_distance > 0 and torch.is_grad_enabled():
            sigmas, albedo, normals = scale_gradients_near_camera(t_starts, t_ends, self.config.near_gradient_distance,
                                                                  sigmas, albedo, normals)
        rgb, opacity, depth, normal, weights = ops.composite(
            t_starts, t_ends, sigmas, albedo, normals, ray_indices=ray_indices, n_rays=n_rays, origins=origins,
            directions=directions, light_positions=light_positions, light_intensity=light_intensity, ambient=ambient,
            mode=shading)
        if background is None:
            rgb = self.background.over(rgb, opacity, directions)
        else:
            rgb = rgb + (1.0 - opacity) * torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device).expand(n_rays, 3)
        return RayOutput(rgb=rgb, opacity=opacity, depth=depth, normal=normal, weights=weights,
                         ray_indices=ray_indices, sample_normals=normals, directions=directions, t_starts=t_starts,
                         t_ends=t_ends)

    def random_solid_background(self, cameras: CameraBatch, probability: float,
                                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-ray backgrounds (B*H*W, 3) for ``render(background=...)``: each image gets, with
        ``probability``, one uniformly random colour, else the background model's colours. Drawn on the
        cameras' device from ``generator`` (no host sync)."""
        B, n = len(cameras), cameras.height * cameras.width
        gen_device = generator.device if generator is not None else cameras.device
        colours = torch.rand(B, 3, generator=generator, device=gen_device).to(cameras.device)
        use = (torch.rand(B, generator=generator, device=gen_device) < probability).to(cameras.device)
        directions = pixel_rays(cameras)[1]
        model = self.background(directions).reshape(B, n, 3)
        return torch.where(use[:, None, None], colours[:, None, :].expand(B, n, 3), model).reshape(-1, 3)

    def render(self, cameras: CameraBatch, shading: str = "albedo", need_normals: bool = False,
               background: Optional[torch.Tensor] = None) -> RenderOutput:
        """Render whole images. With gradients enabled all rays go in one batch (training); without,
        in chunks of config.chunk_rays (previews, export, evaluation)."""
        B, H, W = len(cameras), cameras.height, cameras.width
        # one pass: every pixel's ray and its camera's light, flat (B*H*W, ...)
        args = dict(zip(("origins", "directions", "light_positions", "light_intensity", "ambient"), pixel_rays(cameras)))
        def kept_samples(out):
            return self._n_kept if self._fixed_capacity else out.weights.shape[0]

        if torch.is_grad_enabled():
            out = self.render_rays(shading=shading, need_normals=need_normals, background=background, **args)
            parts, n_samples, rays = [out], kept_samples(out), out
        else:
            parts, n_samples, rays = [], 0, None
            chunk = self.config.chunk_rays
            for start in range(0, B * H * W, chunk):
                sl = {k: v[start:start + chunk] for k, v in args.items()}
                out = self.render_rays(shading=shading, need_normals=need_normals, background=background, **sl)
                parts.append(out)
                n_samples = n_samples + kept_samples(out)
        cat = lambda name, c: _joined([getattr(p, name) for p in parts]).reshape(B, H, W, c)  # noqa: E731

        return RenderOutput(rgb=cat("rgb", 3), opacity=cat("opacity", 1), depth=cat("depth", 1), normal=cat("normal", 3),
                            rays=rays, n_samples=n_samples)


def _joined(parts):
    """torch.cat of the parts, without a copy when there is one (the training render, an unchunked query)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def build_renderer(aabb=(-1.0, -1.0, -1.0, 1.0, 1.0, 1.0), field_config=None, render_config=None,
                   background: str = "mlp", background_color=(1.0, 1.0, 1.0), grid_resolution: int = 64,
                   grid_kwargs: Optional[dict] = None) -> Renderer:
    field = HashGridField(aabb, field_config)
    bg = BackgroundModel(background, background_color)
    grid = OccupancyGrid(aabb, resolution=grid_resolution, **(grid_kwargs or {}))
    return Renderer(field, bg, grid, render_config)
