"""Occupancy grid over the scene box: which cells may hold density, so marching skips empty space.

Follows nerfacc's OccGridEstimator: every few steps every cell decays (occupancy * ema_decay, as in
instant-ngp) and each visited cell takes the max of that and a new estimate, the field's density at a
jittered point in the cell times the render step size (an opacity scale); a cell is occupied when its
value exceeds min(threshold, mean). During warm-up every cell is visited; afterwards a random quarter
of all cells plus a quarter chosen among the occupied ones. The update (ops.occupancy_update) runs on
the device without a host sync.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from . import ops
from .errors import check


class OccupancyGrid(nn.Module):
    def __init__(self, aabb, resolution: int = 64, ema_decay: float = 0.95, threshold: float = 0.01,
                 warmup_steps: int = 256, chunk: int = 2**18):
        super().__init__()
        aabb = torch.as_tensor(aabb, dtype=torch.float32).reshape(-1)
        check(aabb.shape == (6,) and bool((aabb[3:] > aabb[:3]).all()), f"OccupancyGrid: aabb must be (xmin, ymin, zmin, xmax, ymax, zmax) with max > min, got {aabb.tolist()}")
        check(resolution >= 1, f"OccupancyGrid: resolution must be >= 1, got {resolution}")
        self.resolution = int(resolution)
        self.ema_decay = float(ema_decay)
        self.threshold = float(threshold)
        self.warmup_steps = int(warmup_steps)
        self.chunk = int(chunk)
        self.register_buffer("aabb", aabb)
        self.register_buffer("occupancy", torch.zeros(resolution**3))
        # Everything starts occupied so the first renders see the whole box.
        self.register_buffer("binary", torch.ones((resolution,) * 3, dtype=torch.bool))
        r = torch.arange(resolution)
        cells = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
        self.register_buffer("cells", cells, persistent=False)

    def cell_centres(self, indices: torch.Tensor, generator: Optional[torch.Generator] = None, jitter: bool = True) -> torch.Tensor:
        offset = torch.rand(indices.shape[0], 3, device=self.aabb.device, generator=generator) if jitter else torch.full((indices.shape[0], 3), 0.5, device=self.aabb.device)
        unit = (self.cells[indices].float() + offset) / self.resolution
        return self.aabb[:3] + unit * (self.aabb[3:] - self.aabb[:3])

    @torch.no_grad()
    def update(self, step: int, opacity_fn: Callable[[torch.Tensor], torch.Tensor], generator: Optional[torch.Generator] = None) -> None:
        """opacity_fn maps world points (N,3) to density * step_size (N,)."""
        n_cells = self.occupancy.numel()
        device = self.occupancy.device
        if step < self.warmup_steps:
            indices = torch.arange(n_cells, device=device)
        else:
            quarter = max(n_cells // 4, 1)
            uniform = torch.randint(0, n_cells, (quarter,), device=device, generator=generator)
            # occupied cells drawn with multinomial, not gathered with nonzero (whose size the host must read);
            # the tiny floor makes an empty grid draw uniformly
            weights = self.binary.reshape(-1).float() + 1e-9
            occupied = torch.multinomial(weights, quarter, replacement=True, generator=generator)
            indices = torch.cat([uniform, occupied])
        estimates = torch.cat([opacity_fn(self.cell_centres(part, generator)).reshape(-1).float()
                               for part in indices.split(self.chunk)])
        occupancy, binary = ops.occupancy_update(self.occupancy, indices=indices, estimates=estimates,
                                                 decay=self.ema_decay, threshold=self.threshold)
        self.occupancy.copy_(occupancy)
        self.binary.copy_(binary.reshape(self.binary.shape))

    def march(self, origins: torch.Tensor, directions: torch.Tensor, near: float, far: float, step_size: float,
              cone_angle: float = 0.0, max_step_size: float = 1e10):
        """Packed samples (ray_indices, t_starts, t_ends) in occupied cells."""
        return ops.march_rays(origins, directions, aabb=self.aabb, binary=self.binary, near=near, far=far,
                              step_size=step_size, cone_angle=cone_angle, max_step_size=max_step_size)

    def march_fixed(self, origins: torch.Tensor, directions: torch.Tensor, near: float, far: float, step_size: float,
                    cone_angle: float = 0.0, max_step_size: float = 1e10, *, capacity: int):
        """march() into a buffer of `capacity` slots: (ray_indices, t_starts, t_ends, n_samples), see ops.march_rays_fixed."""
        return ops.march_rays_fixed(origins, directions, aabb=self.aabb, binary=self.binary, near=near, far=far,
                                    step_size=step_size, cone_angle=cone_angle, max_step_size=max_step_size,
                                    capacity=capacity)

    def occupied_fraction(self) -> float:
        return float(self.binary.float().mean())
