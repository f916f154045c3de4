"""Ray marching through an occupancy grid: packed samples only where the grid is occupied.

Stepping rule (the native kernel follows it exactly): t starts at the ray's entry into
[near, far] ∩ box; each step has length dt = step_size (cone_angle = 0) or
clamp(t * cone_angle, step_size, max_step_size), so steps grow with distance like instant-ngp;
the interval [t, min(t + dt, t_exit)] is kept when the grid cell holding its midpoint is occupied.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..errors import check


def ray_aabb_intersect(origins: torch.Tensor, directions: torch.Tensor, aabb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Slab test. Returns (t_min, t_max) per ray; t_max < t_min means the ray misses the box."""
    lo, hi = aabb[:3].to(origins), aabb[3:].to(origins)
    safe = torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12).copysign(directions), directions)
    inv = 1.0 / safe
    t_lo = (lo - origins) * inv
    t_hi = (hi - origins) * inv
    t_min = torch.minimum(t_lo, t_hi).amax(dim=-1)
    t_max = torch.maximum(t_lo, t_hi).amin(dim=-1)
    return t_min, t_max


def check_march_inputs(origins, directions, aabb, binary) -> None:
    check(origins.dim() == 2 and origins.shape[1] == 3, f"march: origins must be (N, 3), got {tuple(origins.shape)}")
    check(directions.shape == origins.shape, f"march: directions must match origins {tuple(origins.shape)}, got {tuple(directions.shape)}")
    check(aabb.shape == (6,), f"march: aabb must be (6,) = (xmin, ymin, zmin, xmax, ymax, zmax), got {tuple(aabb.shape)}")
    check(binary.dim() == 3 and binary.dtype == torch.bool, f"march: the occupancy grid must be a (X, Y, Z) bool tensor, got {binary.dtype} {tuple(binary.shape)}")


def march_rays_reference(origins, directions, aabb, binary, near: float, far: float, step_size: float,
                         cone_angle: float = 0.0, max_step_size: float = 1e10):
    """Returns (ray_indices int64, t_starts, t_ends), grouped by ray, increasing t within a ray."""
    check_march_inputs(origins, directions, aabb, binary)
    check(step_size > 0, f"march: step_size must be > 0, got {step_size}")
    n_rays = origins.shape[0]
    device = origins.device
    t_min, t_max = ray_aabb_intersect(origins, directions, aabb)
    t = t_min.clamp_min(near)
    t_exit = t_max.clamp_max(far)
    res = torch.tensor(binary.shape, device=device)
    lo, size = aabb[:3].to(origins), (aabb[3:] - aabb[:3]).to(origins)
    ray_id = torch.arange(n_rays, device=device)
    active = t < t_exit
    out_rays, out_starts, out_ends = [], [], []
    while bool(active.any()):
        idx = ray_id[active]
        t_a, exit_a = t[idx], t_exit[idx]
        if cone_angle > 0:
            dt = (t_a * cone_angle).clamp(step_size, max_step_size)
        else:
            dt = torch.full_like(t_a, step_size)
        t_end = torch.minimum(t_a + dt, exit_a)
        mid = (t_a + t_end) * 0.5
        x = origins[idx] + directions[idx] * mid[:, None]
        cell = torch.floor((x - lo) / size * res).long()
        cell = torch.minimum(cell.clamp_min(0), res - 1)
        occupied = binary[cell[:, 0], cell[:, 1], cell[:, 2]]
        out_rays.append(idx[occupied])
        out_starts.append(t_a[occupied])
        out_ends.append(t_end[occupied])
        t[idx] = t_a + dt
        active = t < t_exit
    if not out_rays:
        empty = origins.new_zeros((0,))
        return torch.zeros((0,), dtype=torch.int64, device=device), empty, empty.clone()
    rays = torch.cat(out_rays)
    starts = torch.cat(out_starts)
    ends = torch.cat(out_ends)
    # Group by ray; within a ray, the loop above already produced increasing t (stable sort keeps it).
    order = torch.sort(rays, stable=True).indices
    return rays[order], starts[order], ends[order]


def march_rays_fixed_reference(origins, directions, aabb, binary, near: float, far: float, step_size: float,
                               cone_angle: float = 0.0, max_step_size: float = 1e10, capacity: int = 0):
    """march_rays_reference's samples in a buffer of `capacity` slots: (ray_indices, t_starts, t_ends), each
    (capacity,), and the total sample count (a 0-d int64 tensor, which may exceed capacity). Slots past the
    total are padding: zero-length intervals [0, 0) of the last ray (alpha 0: no weight, no gradient); when
    the total exceeds capacity the samples past it are dropped."""
    check(capacity >= 0, f"march: capacity must be >= 0, got {capacity}")
    rays, starts, ends = march_rays_reference(origins, directions, aabb, binary, near, far, step_size, cone_angle,
                                              max_step_size)
    total, n = rays.shape[0], min(rays.shape[0], capacity)
    pad = capacity - n
    pad_ray = max(origins.shape[0] - 1, 0)
    return (torch.cat([rays[:n], rays.new_full((pad,), pad_ray)]), torch.cat([starts[:n], starts.new_zeros(pad)]),
            torch.cat([ends[:n], ends.new_zeros(pad)]), torch.tensor(total, dtype=torch.int64, device=rays.device))


def check_occupancy_update_inputs(occupancy, indices, estimates) -> None:
    check(occupancy.dim() == 1 and occupancy.is_floating_point(), f"occupancy update: occupancy must be a flat float tensor, got {occupancy.dtype} {tuple(occupancy.shape)}")
    check(indices.dim() == 1 and indices.dtype == torch.int64, f"occupancy update: indices must be a 1-D int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    check(estimates.shape == indices.shape, f"occupancy update: estimates must match indices {tuple(indices.shape)}, got {tuple(estimates.shape)}")


def occupancy_update_reference(occupancy, indices, estimates, decay: float, threshold: float):
    """One grid update: every cell decays (occupancy * decay, as in instant-ngp; nerfacc decays only the
    visited cells), each visited cell takes the max of that and its estimates (non-finite estimates are
    ignored), and a cell is occupied when its value exceeds min(threshold, mean occupancy) as in nerfacc.
    Returns (occupancy', occupied) as flat tensors."""
    check_occupancy_update_inputs(occupancy, indices, estimates)
    estimates = estimates.to(occupancy.dtype)
    estimates = estimates.masked_fill(~torch.isfinite(estimates), float("-inf"))
    updated = (occupancy * decay).scatter_reduce(0, indices, estimates, reduce="amax", include_self=True)
    return updated, updated > updated.mean().clamp_max(threshold)
