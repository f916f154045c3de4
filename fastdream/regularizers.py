"""Geometry regularisers of DreamFusion.

Orientation loss (DreamFusion, eq. in appendix): normals that face away from the camera while being
visible produce dark, "hollow" shading; penalise them per sample,

    L_orient = sum_i stop_grad(w_i) * max(0, n_i . d)^2

with w_i the rendering weight of sample i, n_i its normal and d the ray direction (pointing from the
camera into the scene, so a visible front-facing normal has n . d < 0). Summed over the samples of
each ray and averaged over the rays.

Opacity regularisers on the accumulated per-ray opacity a:
  entropy   mean over rays of -(a log a + (1-a) log(1-a)): pushes rays to be empty or opaque;
  sparsity  mean sqrt(a^2 + 0.01) (DreamFusion): penalises the foreground area.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops


def orientation_loss(weights: torch.Tensor, normals: Optional[torch.Tensor], directions: torch.Tensor,
                     ray_indices: torch.Tensor, n_rays: Optional[int] = None) -> torch.Tensor:
    """weights (N,), normals (N,3) or None, directions (R,3) per ray, ray_indices (N,) -> scalar."""
    if normals is None or weights.numel() == 0:
        return directions.new_zeros(())
    n_rays = directions.shape[0] if n_rays is None else n_rays
    facing = (normals * directions[ray_indices]).sum(-1).clamp_min(0.0)
    return (weights.detach() * facing.pow(2)).sum() / max(n_rays, 1)


def opacity_entropy(opacity: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    a = opacity.clamp(eps, 1.0 - eps)
    return -(a * torch.log(a) + (1.0 - a) * torch.log(1.0 - a)).mean()


def opacity_sparsity(opacity: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(opacity.pow(2) + 0.01).mean()


def per_ray_orientation(weights, normals, directions, ray_indices) -> torch.Tensor:
    """The orientation penalty of every ray (R,), for diagnostics."""
    facing = (normals * directions[ray_indices]).sum(-1).clamp_min(0.0)
    return ops.accumulate_along_rays(weights.detach(), facing.pow(2)[:, None], ray_indices=ray_indices,
                                     n_rays=directions.shape[0])[:, 0]
