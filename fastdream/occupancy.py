"""Occupancy grid over the scene box: which cells may hold density, so marching skips empty space.

Follows nerfacc's OccGridEstimator: every few steps every cell decays (occupancy * ema_decay, as in
instant-ngp) and each visited cell takes the max of that and a new estimate, the field's density at a
jittered point in the cell times the render step size (an opacity scale); a cell is occupied when its
value exceeds min(threshold, mean). During warm-up every cell is visited; afterwards a random quarter
of all cells plus a quarter chosen among the occupied ones. The update (ops.occupancy_update) runs on
the device without a host sync.

Cells that no training camera sees (mark_invisible_cells, as instant-ngp's mark_untrained_density_grid
and nerfacc's mark_invisible_cells) are never occupied: nothing constrains the field there, so it keeps
its untrained density, which would otherwise hold them open for good. On real captures with a large
box (instant-ngp's aabb_scale) that is most of the box behind and beside the cameras.

On such a box the threshold's cap must come from the region the object is in: `mean_box` restricts
the mean to the cells inside a sub-box (instant-ngp takes it over its finest cascade only, the unit
cube, however large aabb_scale makes the box). Over the whole box the mean is dominated by empty
cells, falls to the opacity of a transparent field, and about a third of a fox-like capture's box
stays occupied for good.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from . import ops
from .errors import check


def _after_load(grid: "OccupancyGrid", incompatible_keys) -> None:
    grid._derive_cell_geometry()  # the loaded aabb may differ from the constructed one


class OccupancyGrid(nn.Module):
    def __init__(self, aabb, resolution: int = 64, ema_decay: float = 0.95, threshold: float = 0.01,
                 warmup_steps: int = 256, chunk: int = 2**18, mean_box=None):
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
        # Derived from aabb (recomputed when a state dict is loaded): each cell's lowest corner and the cell size,
        # so a jittered point is one gather and one addcmul; every cell's index, for the warm-up's full updates.
        self.register_buffer("cell_corners", torch.empty(resolution**3, 3), persistent=False)
        self.register_buffer("cell_size", torch.empty(3), persistent=False)
        self.register_buffer("all_cells", torch.arange(resolution**3), persistent=False)
        self._derive_cell_geometry()
        self.register_load_state_dict_post_hook(_after_load)
        # Cells some training view sees (all of them unless mark_invisible_cells is called). Recomputed
        # from the cameras rather than saved, so checkpoints keep their format.
        self.register_buffer("visible", torch.ones(resolution**3, dtype=torch.bool), persistent=False)
        self.all_visible = True  # host flag: no visibility mask to apply in update()
        # Cells whose mean caps the threshold (see the module docstring); None: every cell.
        self.register_buffer("mean_cells", None, persistent=False)
        if mean_box is not None:
            box = torch.as_tensor(mean_box, dtype=torch.float32).reshape(-1)
            check(box.shape == (6,) and bool((box[3:] > box[:3]).all()), f"OccupancyGrid: mean_box must be (xmin, ymin, zmin, xmax, ymax, zmax) with max > min, got {box.tolist()}")
            centres = self.cell_centres(torch.arange(resolution**3), jitter=False)
            inside = ((centres >= box[:3]) & (centres <= box[3:])).all(dim=1)
            check(bool(inside.any()), f"OccupancyGrid: mean_box {box.tolist()} holds no cell centre of the grid over {aabb.tolist()}")
            self.register_buffer("mean_cells", inside.nonzero().squeeze(1), persistent=False)

    @torch.no_grad()
    def mark_invisible_cells(self, c2w: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor, cx: torch.Tensor,
                             cy: torch.Tensor, width: int, height: int, near: float = 0.0) -> float:
        """Mark the cells none of the pinhole cameras (c2w (N,4,4) OpenGL, intrinsics (N,) in pixels of
        width x height images) sees: no corner of the cell projects into any image in front of the camera
        (beyond near). Those cells are never occupied from then on. Returns the visible fraction."""
        res = self.resolution
        lo, size = self.aabb[:3], self.aabb[3:] - self.aabb[:3]
        corners = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], device=lo.device)
        visible = torch.zeros(res**3, dtype=torch.bool, device=lo.device)
        w2c = torch.linalg.inv(c2w.to(lo.device, torch.float32))
        intr = [torch.as_tensor(v, dtype=torch.float32, device=lo.device).reshape(-1) for v in (fx, fy, cx, cy)]
        for part in torch.arange(res**3, device=lo.device).split(max(self.chunk // 8, 1)):
            pts = lo + (self.cells[part][:, None, :] + corners).reshape(-1, 3).float() / res * size  # (M*8, 3)
            seen = torch.zeros(pts.shape[0], dtype=torch.bool, device=lo.device)
            for k in range(w2c.shape[0]):
                p = pts @ w2c[k, :3, :3].T + w2c[k, :3, 3]
                z = -p[:, 2]  # OpenGL: the camera looks down -z
                u = intr[0][k] * p[:, 0] / z.clamp_min(1e-9) + intr[2][k]
                v = -intr[1][k] * p[:, 1] / z.clamp_min(1e-9) + intr[3][k]
                seen |= (z > near) & (u >= 0) & (u <= width) & (v >= 0) & (v <= height)
            visible[part] = seen.reshape(-1, 8).any(dim=1)
        self.visible.copy_(visible)
        self.all_visible = bool(visible.all())
        self.occupancy.masked_fill_(~visible, 0.0)
        self.binary.logical_and_(visible.reshape(self.binary.shape))
        return float(visible.float().mean())

    @torch.no_grad()
    def _derive_cell_geometry(self) -> None:
        size = (self.aabb[3:] - self.aabb[:3]) / self.resolution
        self.cell_size.copy_(size)
        self.cell_corners.copy_(self.aabb[:3] + self.cells.to(size.dtype) * size)

    def cell_centres(self, indices: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                     jitter: bool = True) -> torch.Tensor:
        """World points in the cells ``indices`` (None: every cell): uniformly jittered, or their centres."""
        corners = self.cell_corners if indices is None else self.cell_corners[indices]
        n = corners.shape[0]
        offset = torch.rand(n, 3, device=self.aabb.device, generator=generator) if jitter else torch.full((n, 3), 0.5, device=self.aabb.device)
        return torch.addcmul(corners, offset, self.cell_size)

    @torch.no_grad()
    def update(self, step: int, opacity_fn: Callable[[torch.Tensor], torch.Tensor], generator: Optional[torch.Generator] = None) -> None:
        """opacity_fn maps world points (N,3) to density * step_size (N,). Few ops (the step that updates the grid
        dispatches the most ops of any training step): no split or cat for a single chunk, no visibility mask
        while every cell is visible."""
        n_cells = self.occupancy.numel()
        if step < self.warmup_steps:
            indices, sampled = self.all_cells, None
        else:
            quarter = max(n_cells // 4, 1)
            uniform = torch.randint(0, n_cells, (quarter,), device=self.occupancy.device, generator=generator)
            # occupied cells drawn with multinomial, not gathered with nonzero (whose size the host must read);
            # the tiny floor makes an empty grid draw uniformly
            occupied = torch.multinomial(torch.add(self.binary.view(-1), 1e-9), quarter, replacement=True,
                                         generator=generator)
            indices = sampled = torch.cat([uniform, occupied])
        if indices.shape[0] <= self.chunk:
            estimates = opacity_fn(self.cell_centres(sampled, generator))
        else:
            estimates = torch.cat([opacity_fn(self.cell_centres(part, generator)).reshape(-1)
                                   for part in indices.split(self.chunk)])
        estimates = estimates.reshape(-1) if estimates.dim() != 1 else estimates
        if not self.all_visible:
            estimates = estimates * self.visible[indices]  # unseen cells decay to empty and stay there
        occupancy, binary = ops.occupancy_update(self.occupancy, indices=indices, estimates=estimates,
                                                 decay=self.ema_decay, threshold=self.threshold)
        if self.mean_cells is not None:
            threshold = occupancy[self.mean_cells].clamp_min(0.0).mean().clamp_max(self.threshold)
            binary = occupancy > threshold
        self.occupancy = occupancy  # the op's fresh tensor becomes the buffer (renders read only `binary`)
        if self.all_visible:  # in place: a captured step's march reads this very tensor
            self.binary.view(-1).copy_(binary)
        else:
            torch.logical_and(binary, self.visible, out=self.binary.view(-1))

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
