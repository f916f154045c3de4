"""Differentiable ops of the engine. Each routes to the native extension when it is built for the
tensor's device and the backend chosen (`use_backend`, `set_backend`) allows it, and otherwise runs its plain-PyTorch twin, which is also
the oracle the native kernels are tested against."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from .. import _backend
from .._backend import backend_name, set_backend, use_backend
from .compositing import composite_reference
from .hash_encoding import (DEFAULT_PER_LEVEL_SCALE, HashGridLayout, check_hash_encode_inputs, default_per_level_scale,
                            hash_encode_reference, hash_grid_layout, hash_grid_n_params)
from .marching import march_rays_reference, occupancy_update_reference, ray_aabb_intersect
from .shading import SHADING_MODES, shade, shading_code
from .volume_rendering import accumulate_along_rays, render_weights_reference

__all__ = [
    "hash_encode", "hash_grid_n_params", "hash_grid_layout", "HashGridLayout", "default_per_level_scale",
    "DEFAULT_PER_LEVEL_SCALE", "render_weights", "accumulate_along_rays", "march_rays", "occupancy_update", "ray_aabb_intersect",
    "composite", "shade", "SHADING_MODES", "shading_code", "use_backend", "set_backend", "backend_name",
]

_cached_layout = lru_cache(maxsize=64)(hash_grid_layout)


def hash_encode(x: torch.Tensor, params: torch.Tensor, n_levels: int = 16, n_features_per_level: int = 2,
                log2_hashmap_size: int = 19, base_resolution: int = 16, per_level_scale: Optional[float] = None,
                check_range: bool = True) -> torch.Tensor:
    """Encode points x (N, 3) in [0, 1] with a tiny-cuda-nn-compatible HashGrid -> (N, n_levels * F)."""
    layout = _cached_layout(n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale)
    if check_range:
        check_hash_encode_inputs(x, params, layout)
    if _backend.use_native(x.device):
        from . import _native
        return _native.hash_encode(x, params, layout)
    return hash_encode_reference(x, params, layout)


def render_weights(t_starts, t_ends, sigmas, ray_indices, n_rays: int):
    """(weights, transmittance, alphas) per sample, nerfacc's render_weight_from_density."""
    if _backend.use_native(sigmas.device):
        from . import _native
        return _native.render_weights(t_starts, t_ends, sigmas, ray_indices, n_rays)
    return render_weights_reference(t_starts, t_ends, sigmas, ray_indices, n_rays)


def march_rays(origins, directions, aabb, binary, near: float, far: float, step_size: float,
               cone_angle: float = 0.0, max_step_size: float = 1e10):
    """Packed samples (ray_indices, t_starts, t_ends) inside occupied cells; no gradients."""
    with torch.no_grad():
        if _backend.use_native(origins.device):
            from . import _native
            return _native.march_rays(origins, directions, aabb, binary, near, far, step_size, cone_angle, max_step_size)
        return march_rays_reference(origins, directions, aabb, binary, near, far, step_size, cone_angle, max_step_size)


def occupancy_update(occupancy, indices, estimates, decay: float, threshold: float):
    """One occupancy-grid update (decay, max with the visited cells' estimates, mean-capped threshold)
    -> (occupancy', occupied), flat; see ops.marching.occupancy_update_reference. No host sync."""
    with torch.no_grad():
        if _backend.use_native(occupancy.device):
            from . import _native
            return _native.occupancy_update(occupancy, indices, estimates, decay, threshold)
        return occupancy_update_reference(occupancy, indices, estimates, decay, threshold)


def composite(t_starts, t_ends, ray_indices, n_rays: int, sigmas, albedo, normals, origins, directions,
              light_positions, light_intensity, ambient, mode: str):
    """Fused shading + compositing -> (rgb, opacity, depth, normal, weights); see ops.compositing."""
    if _backend.use_native(sigmas.device):
        from . import _native
        return _native.composite(t_starts, t_ends, ray_indices, n_rays, sigmas, albedo, normals, origins, directions,
                                 light_positions, light_intensity, ambient, mode)
    return composite_reference(t_starts, t_ends, ray_indices, n_rays, sigmas, albedo, normals, origins, directions,
                               light_positions, light_intensity, ambient, mode)
