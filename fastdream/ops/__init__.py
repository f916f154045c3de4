"""Differentiable ops of the engine. Each routes to the native extension when it is built for the
tensor's device and the backend chosen (`use_backend`, `set_backend`) allows it, and otherwise runs its plain-PyTorch twin, which is also
the oracle the native kernels are tested against.

Signatures follow nerfacc and gsplat: the main tensors are positional, everything else is keyword-only.
Shapes: N points or samples, R rays. Packed samples (nerfacc's convention) are three (N,) tensors
`ray_indices` (int64, non-decreasing), `t_starts`, `t_ends`, each sample the interval [t_start, t_end)
along ray `ray_indices[i]`; `aabb` is (6,) = (x_min, y_min, z_min, x_max, y_max, z_max)."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from .. import _backend
from .._backend import backend_name, set_backend, use_backend
from .cameras import camera_rays_reference, orbit_cameras_reference
from .compositing import composite_reference
from .frequency_encoding import frequency_encode_reference
from .hash_encoding import (DEFAULT_PER_LEVEL_SCALE, HashGridLayout, check_hash_encode_inputs, default_per_level_scale,
                            hash_encode_reference, hash_grid_layout, hash_grid_n_params)
from .marching import march_rays_fixed_reference, march_rays_reference, occupancy_update_reference, ray_aabb_intersect
from .pruning import compact_visible_samples_reference
from .rasterization import antialias_reference, interpolate_reference, rasterize_reference, triangle_adjacency
from .shading import SHADING_MODES, shade, shading_code
from .volume_rendering import accumulate_along_rays as _accumulate_along_rays
from .volume_rendering import render_weights_reference

__all__ = [
    "hash_encode", "hash_grid_n_params", "hash_grid_layout", "HashGridLayout", "default_per_level_scale",
    "DEFAULT_PER_LEVEL_SCALE", "render_weights", "accumulate_along_rays", "march_rays", "march_rays_fixed", "compact_visible_samples", "occupancy_update", "ray_aabb_intersect",
    "composite", "shade", "SHADING_MODES", "shading_code", "rasterize", "interpolate", "antialias", "triangle_adjacency",
    "orbit_cameras", "camera_rays", "frequency_encode", "use_backend",
    "set_backend", "backend_name",
]

_cached_layout = lru_cache(maxsize=64)(hash_grid_layout)


def hash_encode(x: torch.Tensor, params: torch.Tensor, *, n_levels: int = 16, n_features_per_level: int = 2,
                log2_hashmap_size: int = 19, base_resolution: int = 16, per_level_scale: Optional[float] = None,
                check_range: bool = True) -> torch.Tensor:
    """tiny-cuda-nn-compatible HashGrid encoding.

    x (N, 3) points in [0, 1]; params (hash_grid_n_params(...),) the flattened tables (float32, float16 or
    float64). Returns (N, n_levels * n_features_per_level) in params' dtype, differentiable w.r.t. both
    (twice w.r.t. params, for analytic normals)."""
    layout = _cached_layout(n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale)
    if check_range:
        check_hash_encode_inputs(x, params, layout)
    if _backend.use_native(x.device):
        from . import _native
        return _native.hash_encode(x, params, layout)
    return hash_encode_reference(x, params, layout)


def render_weights(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor, *, ray_indices: torch.Tensor,
                   n_rays: int):
    """nerfacc's render_weight_from_density on packed samples.

    t_starts, t_ends, sigmas, ray_indices (N,); returns (weights, transmittance, alphas), each (N,):
    alpha = 1 - exp(-sigma dt), exclusive transmittance, weight = T * alpha. Differentiable w.r.t. all three."""
    if _backend.use_native(sigmas.device):
        from . import _native
        return _native.render_weights(t_starts, t_ends, sigmas, ray_indices, n_rays)
    return render_weights_reference(t_starts, t_ends, sigmas, ray_indices, n_rays)


def accumulate_along_rays(weights: torch.Tensor, values: Optional[torch.Tensor] = None, *, ray_indices: torch.Tensor,
                          n_rays: int) -> torch.Tensor:
    """Sum of weight * value per ray: weights (N,), values (N, C) or None (accumulate the weights: opacity),
    ray_indices (N,) -> (n_rays, C) (C = 1 without values)."""
    return _accumulate_along_rays(weights, values, ray_indices, n_rays)


def march_rays(origins: torch.Tensor, directions: torch.Tensor, *, aabb: torch.Tensor, binary: torch.Tensor,
               near: float, far: float, step_size: float, cone_angle: float = 0.0, max_step_size: float = 1e10):
    """Occupancy-grid ray marching (instant-ngp stepping, empty space skipped).

    origins, directions (R, 3); aabb (6,); binary (X, Y, Z) bool occupancy of the box's cells. Returns the
    packed samples (ray_indices, t_starts, t_ends), each (N,), inside occupied cells; no gradients."""
    with torch.no_grad():
        if _backend.use_native(origins.device):
            from . import _native
            return _native.march_rays(origins, directions, aabb, binary, near, far, step_size, cone_angle, max_step_size)
        return march_rays_reference(origins, directions, aabb, binary, near, far, step_size, cone_angle, max_step_size)


def march_rays_fixed(origins: torch.Tensor, directions: torch.Tensor, *, aabb: torch.Tensor, binary: torch.Tensor,
                     near: float, far: float, step_size: float, cone_angle: float = 0.0, max_step_size: float = 1e10,
                     capacity: int):
    """march_rays into a fixed-capacity buffer, with no host sync (static shapes, capturable).

    Returns (ray_indices, t_starts, t_ends), each (capacity,), and n_samples, the total sample count as a 0-d
    int64 device tensor. The first min(n_samples, capacity) slots are march_rays' packed samples; the rest are
    padding, zero-length intervals [0, 0) of the last ray, which composite to weight 0 with no gradient. When
    n_samples > capacity the samples past the capacity are dropped: read n_samples later and grow the buffer."""
    with torch.no_grad():
        if _backend.use_native(origins.device):
            from . import _native
            return _native.march_rays_fixed(origins, directions, aabb, binary, near, far, step_size, cone_angle,
                                            max_step_size, capacity)
        return march_rays_fixed_reference(origins, directions, aabb, binary, near, far, step_size, cone_angle,
                                          max_step_size, capacity)


def compact_visible_samples(ray_indices: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor,
                            sigmas: torch.Tensor, *, n_rays: int, early_stop_eps: float, alpha_threshold: float,
                            capacity: int, n_samples: Optional[torch.Tensor] = None):
    """The pruning pass: keep the marched samples still visible and not transparent, compacted in order.

    Packed samples ray_indices, t_starts, t_ends and their densities sigmas (N,), each ray's samples
    contiguous and in order (as march_rays writes them); n_samples, the valid count as a 0-d int64 device
    tensor (march_rays_fixed's), or None when all N are valid. Each ray is walked front to back accumulating
    the transmittance T (render_weights' arithmetic) and stops at the first sample with T < early_stop_eps
    (early ray termination); of the samples before, those with alpha >= alpha_threshold are kept. Returns
    (ray_indices, t_starts, t_ends), each (capacity,): the kept samples in their order, then padding
    (zero-length intervals [0, 0) of ray n_rays - 1), and n_kept, the kept total as a 0-d int64 device
    tensor (no host sync; past the capacity the samples are dropped). No gradients. See ops.pruning."""
    with torch.no_grad():
        if _backend.use_native(sigmas.device):
            from . import _native
            return _native.compact_visible_samples(ray_indices, t_starts, t_ends, sigmas, n_samples, n_rays,
                                                   early_stop_eps, alpha_threshold, capacity)
        return compact_visible_samples_reference(ray_indices, t_starts, t_ends, sigmas, n_samples, n_rays,
                                                 early_stop_eps, alpha_threshold, capacity)


def occupancy_update(occupancy: torch.Tensor, *, indices: torch.Tensor, estimates: torch.Tensor, decay: float,
                     threshold: float):
    """One occupancy-grid update: every cell of occupancy (C,) decays by `decay`, the visited cells indices (M,)
    take the max with their estimates (M,); occupied = above min(threshold, mean). Returns (occupancy', occupied),
    (C,) each, flat; see ops.marching.occupancy_update_reference. No host sync."""
    with torch.no_grad():
        if _backend.use_native(occupancy.device):
            from . import _native
            return _native.occupancy_update(occupancy, indices, estimates, decay, threshold)
        return occupancy_update_reference(occupancy, indices, estimates, decay, threshold)


def composite(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor, albedo: torch.Tensor,
              normals: Optional[torch.Tensor], *, ray_indices: torch.Tensor, n_rays: int, origins: torch.Tensor,
              directions: torch.Tensor, light_positions: torch.Tensor, light_intensity: torch.Tensor,
              ambient: torch.Tensor, mode: str):
    """Fused DreamFusion shading + compositing in one pass per ray.

    Per sample (N,): t_starts, t_ends, sigmas, ray_indices; (N, 3): albedo, normals (None for mode "albedo").
    Per ray: origins, directions, light_positions (R, 3), light_intensity, ambient (R,). mode: albedo |
    lambertian | textureless. Returns (rgb (R, 3), opacity (R, 1), depth (R, 1), normal (R, 3), weights (N,));
    differentiable w.r.t. sigmas, albedo and normals. See ops.compositing."""
    if _backend.use_native(sigmas.device):
        from . import _native
        return _native.composite(t_starts, t_ends, ray_indices, n_rays, sigmas, albedo, normals, origins, directions,
                                 light_positions, light_intensity, ambient, mode)
    return composite_reference(t_starts, t_ends, ray_indices, n_rays, sigmas, albedo, normals, origins, directions,
                               light_positions, light_intensity, ambient, mode)


def orbit_cameras(camera_u: torch.Tensor, light_u: torch.Tensor, light_noise: torch.Tensor, *, lows: torch.Tensor,
                  spans: torch.Tensor, width: int, height: int, light_perturb: float = 1.0, wrap_azimuth: bool = False):
    """DreamFusion's random orbit cameras and point lights from their draws, one pass per camera.

    camera_u (4, B) uniform draws of elevation, azimuth, distance, focal; light_u (3, B) of light distance,
    intensity, ambient; each scaled to low + u * span by lows and spans (7 values, in that order);
    light_noise (B, 3) standard-normal jitter of the light direction, times light_perturb. wrap_azimuth: take
    the azimuth % 360. Returns the tensors of a CameraBatch (c2w (B, 4, 4), fx, fy, cx, cy, elevation,
    azimuth, distance (B,), light_position (B, 3), light_intensity (the diffuse share intensity *
    max(1 - ambient, 0)), ambient (B,)). No gradients. See ops.cameras.orbit_cameras_reference."""
    with torch.no_grad():
        if _backend.use_native(camera_u.device):
            from . import _native
            return _native.orbit_cameras(camera_u, light_u, light_noise, lows, spans, width, height, light_perturb,
                                         wrap_azimuth)
        return orbit_cameras_reference(camera_u, light_u, light_noise, lows, spans, width, height, light_perturb,
                                       wrap_azimuth)


def camera_rays(c2w: torch.Tensor, *, fx: torch.Tensor, fy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                light_position: torch.Tensor, light_intensity: torch.Tensor, ambient: torch.Tensor, height: int,
                width: int):
    """Pinhole rays through the pixel centres of B cameras, with each pixel's copy of its camera's light.

    c2w (B, 4, 4) OpenGL camera-to-world; fx, fy, cx, cy (B,) intrinsics in pixels; light_position (B, 3),
    light_intensity, ambient (B,). Returns, for R = B * height * width pixels (row-major per camera): origins,
    unit directions, light_positions (R, 3), light_intensity, ambient (R,), in c2w's dtype. Differentiable
    (through the PyTorch twin) when an input requires grad. See ops.cameras.camera_rays_reference."""
    args = (c2w, fx, fy, cx, cy, light_position, light_intensity, ambient)
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    if _backend.use_native(c2w.device) and not differentiable and c2w.dtype in (torch.float32, torch.float64):
        from . import _native
        return _native.camera_rays(*args, height, width)
    return camera_rays_reference(*args, height, width)


def frequency_encode(x: torch.Tensor, *, n_frequencies: int) -> torch.Tensor:
    """NeRF's frequency encoding: x (N, D) -> (N, D * (1 + 2 * n_frequencies)) = [x, sin(2^k pi x_c),
    cos(2^k pi x_c)], the sines and the cosines each ordered by component c, then by k < n_frequencies.
    Differentiable (through the PyTorch twin) when x requires grad. See ops.frequency_encoding."""
    differentiable = torch.is_grad_enabled() and x.requires_grad
    if _backend.use_native(x.device) and not differentiable and x.dtype in (torch.float32, torch.float64):
        from . import _native
        return _native.frequency_encode(x, n_frequencies)
    return frequency_encode_reference(x, n_frequencies)


def rasterize(pos: torch.Tensor, tri: torch.Tensor, *, resolution: tuple[int, int]):
    """Triangle rasterization with a z-buffer (nvdiffrast's rasterize).

    pos (B, V, 4) clip-space vertices (one mesh seen by B cameras), tri (F, 3) int64; resolution (H, W).
    Returns (tri_id (B, H, W) int64, -1 where no triangle covers the pixel; bary (B, H, W, 2) the
    perspective-correct barycentrics (b0, b1) of the triangle's first two vertices; depth (B, H, W) = z / w).
    bary and depth are differentiable w.r.t. pos. Conventions: see ops.rasterization."""
    height, width = (int(v) for v in resolution)
    if _backend.use_native(pos.device):
        from . import _native
        return _native.rasterize(pos, tri, height, width)
    return rasterize_reference(pos, tri, height, width)


def interpolate(attr: torch.Tensor, tri_id: torch.Tensor, bary: torch.Tensor, *, tri: torch.Tensor) -> torch.Tensor:
    """Vertex attributes attr (V, C) at the pixels of rasterize's (tri_id, bary): (B, H, W, C), zeros off the mesh.
    Differentiable w.r.t. attr and bary (so, through rasterize, w.r.t. the vertex positions)."""
    if _backend.use_native(attr.device):
        from . import _native
        return _native.interpolate(attr, tri_id, bary, tri)
    return interpolate_reference(attr, tri_id, bary, tri)


def antialias(color: torch.Tensor, tri_id: torch.Tensor, depth: torch.Tensor, *, pos: torch.Tensor,
              tri: torch.Tensor, topology: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Silhouette antialiasing (nvdiffrast's antialias): color (B, H, W, C) rendered from rasterize's
    (tri_id, depth) of the mesh (pos (B, V, 4), tri (F, 3)) is blended across silhouette edges by the pixel
    area the edge leaves uncovered, so the outline is differentiable w.r.t. pos. An edge is a silhouette when no
    triangle continues the surface across it or the one that does faces the other way on screen; topology is
    `triangle_adjacency(tri)`, computed here when None (pass it to reuse it while the triangles stay the same).
    Returns (B, H, W, C), differentiable w.r.t. color and pos. See ops.rasterization.antialias_reference."""
    if _backend.use_native(color.device):
        from . import _native
        return _native.antialias(color, tri_id, depth, pos, tri, topology)
    return antialias_reference(color, tri_id, depth, pos, tri, topology)
