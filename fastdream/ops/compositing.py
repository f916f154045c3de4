"""Fused compositing + shading: per-sample density, albedo and normals -> per-ray images.

Reference twin of the native fused kernel. Per ray it accumulates
  rgb     = sum_i w_i * shade(albedo_i, normal_i, x_i)
  opacity = sum_i w_i,  depth = sum_i w_i * (t_start_i + t_end_i) / 2,  normal = sum_i w_i * n_i
with w_i from `render_weights` (nerfacc conventions). x_i is the interval midpoint o + d * t_mid.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .shading import shade, shading_code
from .volume_rendering import accumulate_along_rays, render_weights_reference


def composite_reference(t_starts, t_ends, ray_indices, n_rays: int, sigmas, albedo, normals: Optional[torch.Tensor],
                        origins, directions, light_positions, light_intensity, ambient, mode: str
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns rgb (R,3), opacity (R,1), depth (R,1), normal (R,3) and the per-sample weights (N,).

    origins/directions/light_positions are per ray (R,3); light_intensity/ambient per ray (R,).
    normals may be None in "albedo" mode (the normal image is then zero).
    """
    code = shading_code(mode)
    weights, _, _ = render_weights_reference(t_starts, t_ends, sigmas, ray_indices, n_rays)
    if code == 0:
        colours = albedo
    else:
        t_mid = (t_starts + t_ends) * 0.5
        positions = origins[ray_indices] + directions[ray_indices] * t_mid[:, None]
        colours = shade(albedo, normals, positions, light_positions[ray_indices], light_intensity[ray_indices], ambient[ray_indices], mode)
    rgb = accumulate_along_rays(weights, colours, ray_indices, n_rays)
    opacity = accumulate_along_rays(weights, None, ray_indices, n_rays)
    depth = accumulate_along_rays(weights, ((t_starts + t_ends) * 0.5)[:, None], ray_indices, n_rays)
    if normals is not None:
        normal = accumulate_along_rays(weights, normals, ray_indices, n_rays)
    else:
        normal = rgb.new_zeros((n_rays, 3))
    return rgb, opacity, depth, normal, weights
