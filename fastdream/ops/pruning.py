"""The gradient-free pruning pass on packed samples (nerfacc's visibility test), with compaction.

Given marched samples and their densities, a sample is kept when the ray's transmittance in front of it is
at least `early_stop_eps` (behind an opaque surface nothing is seen: early ray termination) and its alpha
is at least `alpha_threshold`. The kept samples are compacted, in order, into `capacity` slots; the rest
are padding (zero-length intervals [0, 0) of the last ray: weight 0, no gradient), and the kept total is
returned as a 0-d device tensor, which may exceed the capacity (the outputs are then cut there).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import check
from .volume_rendering import check_packed, render_weights_reference


def check_compact_inputs(ray_indices, t_starts, t_ends, sigmas, n_samples, n_rays: int, capacity: int) -> None:
    check_packed(t_starts, t_ends, sigmas, ray_indices, "compact_visible_samples")
    check(ray_indices.dtype == torch.int64, f"compact_visible_samples: ray_indices must be int64, got {ray_indices.dtype}")
    check(t_ends.dtype == t_starts.dtype, f"compact_visible_samples: t_starts and t_ends must share a dtype, got {t_starts.dtype} and {t_ends.dtype}")
    check(n_samples is None or (isinstance(n_samples, torch.Tensor) and n_samples.numel() == 1 and n_samples.dtype == torch.int64),
          "compact_visible_samples: n_samples must be None or a one-element int64 tensor (the valid count, as march_rays_fixed returns it)")
    check(n_rays >= 0, f"compact_visible_samples: n_rays must be >= 0, got {n_rays}")
    check(capacity >= 0, f"compact_visible_samples: capacity must be >= 0, got {capacity}")


def compact_visible_samples_reference(ray_indices, t_starts, t_ends, sigmas, n_samples: Optional[torch.Tensor],
                                      n_rays: int, early_stop_eps: float, alpha_threshold: float, capacity: int):
    """With fixed-shape ops only (a prefix sum and a scatter, no boolean-mask gather); slots from n_samples on
    must keep the ray indices sorted (march_rays_fixed's padding does)."""
    check_compact_inputs(ray_indices, t_starts, t_ends, sigmas, n_samples, n_rays, capacity)
    device, n = ray_indices.device, ray_indices.shape[0]
    _, trans, alphas = render_weights_reference(t_starts, t_ends, sigmas.to(t_starts.dtype), ray_indices, n_rays)
    slots = torch.arange(n, device=device)
    keep = (trans >= early_stop_eps) & (alphas >= alpha_threshold)
    if n_samples is not None:
        keep &= slots < n_samples.reshape(())
    n_kept = keep.sum()
    pad_ray = max(n_rays - 1, 0)
    if n == 0:
        return (ray_indices.new_full((capacity,), pad_ray), t_starts.new_zeros(capacity), t_ends.new_zeros(capacity),
                n_kept)
    # Kept sample i goes to slot (kept samples before i); the others, and kept samples past the capacity, to a
    # spare slot that is cut off.
    rank = torch.cumsum(keep, 0) - 1
    dest = torch.where(keep & (rank < capacity), rank, capacity)
    source = slots.new_zeros(capacity + 1).scatter_(0, dest, slots)[:capacity]
    filled = torch.arange(capacity, device=device) < n_kept
    return (torch.where(filled, ray_indices[source], pad_ray), torch.where(filled, t_starts[source], 0.0),
            torch.where(filled, t_ends[source], 0.0), n_kept)
