"""Volume rendering on packed samples, with nerfacc's conventions.

Samples of all rays are packed into one flat array, grouped by ray (ray_indices non-decreasing),
each sample an interval [t_start, t_end) along its ray. alpha = 1 - exp(-sigma * (t_end - t_start)),
transmittance is exclusive (the first sample of a ray sees T = 1), weight = T * alpha.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import check


def check_packed(t_starts: torch.Tensor, t_ends: torch.Tensor, values: torch.Tensor, ray_indices: torch.Tensor, name: str) -> None:
    n = ray_indices.shape[0] if ray_indices.dim() == 1 else -1
    check(ray_indices.dim() == 1 and not ray_indices.is_floating_point(), f"{name}: ray_indices must be a 1-D integer tensor, got {ray_indices.dtype} of shape {tuple(ray_indices.shape)}")
    for label, tensor in (("t_starts", t_starts), ("t_ends", t_ends), ("sigmas", values)):
        check(tensor.shape == (n,), f"{name}: {label} must have shape ({n},) like ray_indices, got {tuple(tensor.shape)}")
        check(tensor.is_floating_point(), f"{name}: {label} must be floating point, got {tensor.dtype}")


def segment_layout(ray_indices: torch.Tensor, n_rays: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each sample, its position within its ray; and each ray's sample count."""
    counts = torch.bincount(ray_indices, minlength=n_rays)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(ray_indices.shape[0], device=ray_indices.device) - starts[ray_indices]
    return position, counts


def exclusive_segment_cumsum(values: torch.Tensor, ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Per-ray exclusive prefix sum; scatters into a (n_rays, max_samples) block so rays never mix."""
    if values.numel() == 0:
        return values.clone()
    position, counts = segment_layout(ray_indices, n_rays)
    block = values.new_zeros((n_rays, int(counts.max()) + 1))
    block = block.index_put((ray_indices, position + 1), values)
    block = torch.cumsum(block, dim=1)
    return block[ray_indices, position]


def render_weights_reference(t_starts, t_ends, sigmas, ray_indices, n_rays: int):
    check_packed(t_starts, t_ends, sigmas, ray_indices, "render_weights")
    sigmas_dt = sigmas * (t_ends - t_starts)
    alphas = 1.0 - torch.exp(-sigmas_dt)
    transmittance = torch.exp(-exclusive_segment_cumsum(sigmas_dt, ray_indices, n_rays))
    weights = transmittance * alphas
    return weights, transmittance, alphas


def accumulate_along_rays(weights: torch.Tensor, values: Optional[torch.Tensor], ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Sum of weight * value per ray -> (n_rays, C); values None accumulates the weights (opacity)."""
    check(weights.dim() == 1, f"accumulate_along_rays: weights must be 1-D, got shape {tuple(weights.shape)}")
    check(ray_indices.shape == weights.shape, f"accumulate_along_rays: ray_indices shape {tuple(ray_indices.shape)} differs from weights {tuple(weights.shape)}")
    if values is None:
        src = weights[:, None]
    else:
        check(values.dim() == 2 and values.shape[0] == weights.shape[0], f"accumulate_along_rays: values must be (N, C) with N={weights.shape[0]}, got {tuple(values.shape)}")
        src = weights[:, None] * values
    out = src.new_zeros((n_rays, src.shape[1]))
    return out.index_add(0, ray_indices.long(), src)
