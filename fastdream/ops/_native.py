"""Python side of the native kernels (fastdream._C -> torch.ops.fastdream.*).

Importing this module loads the extension, registers a fake (meta) implementation for each op, so the
ops work under torch.compile and pass torch.library.opcheck, and registers their autograd formulas
(torch.library.register_autograd), so the raw ops are differentiable too. The public functions have the
same signatures and returns as the reference ops they replace (fastdream.ops.*_reference).

Gradients:
- hash_encode: to params and x, and double backward (grad of dL/dx w.r.t. params, dL/dy and x), so
  analytic normals (autograd.grad(density, x, create_graph=True)) train natively.
- render_weights: to sigmas, t_starts and t_ends (first order only).
- composite: to sigmas, albedo and normals (first order only). When t_starts/t_ends, rays, lights,
  light_intensity or ambient require grad, composite() falls back to the reference (exact autograd).
- rasterize: barycentrics and depth to the clip-space vertex positions; interpolate: to the attributes
  and the barycentrics; antialias: to the colours and the vertex positions (first order only).
- march_rays / march_rays_fixed / compact_visible_samples / occupancy_update / orbit_cameras / camera_rays /
  frequency_encode: no gradients (ops.camera_rays and ops.frequency_encode run the reference when an input
  requires grad).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..errors import check
from .cameras import check_camera_rays_inputs, check_orbit_inputs
from .compositing import composite_reference
from .frequency_encoding import check_frequency_encode_inputs
from .hash_encoding import HashGridLayout
from .marching import check_march_inputs, check_occupancy_update_inputs
from .pruning import check_compact_inputs
from .rasterization import check_mesh_inputs, check_topology, triangle_adjacency
from .shading import shading_code
from .volume_rendering import check_packed

_C = _backend.extension()
if _C is None:  # pragma: no cover - callers check _backend.use_native first
    raise ImportError(f"fastdream native extension is not available: {_backend.extension_error()}")

ops = torch.ops.fastdream
_LIB = "fastdream::"


# ----------------------------------------------------------------------------- fake implementations
@torch.library.register_fake(_LIB + "hash_encode_fwd")
def _hash_encode_fwd_fake(x, params, scales, resolutions, offsets, hashed, n_features):
    return x.new_empty((x.shape[0], len(scales) * n_features))


@torch.library.register_fake(_LIB + "hash_encode_bwd")
def _hash_encode_bwd_fake(grad_y, x, params, scales, resolutions, offsets, hashed, n_features, need_params_grad,
                          need_x_grad):
    gp = params.new_empty((params.shape[0],)) if need_params_grad else params.new_empty((0,))
    gx = x.new_empty((x.shape[0], 3)) if need_x_grad else x.new_empty((0,))
    return gp, gx


@torch.library.register_fake(_LIB + "hash_encode_bwd_bwd")
def _hash_encode_bwd_bwd_fake(ggx, grad_y, x, params, scales, resolutions, offsets, hashed, n_features,
                              need_params_grad, need_x_grad):
    ggy = x.new_empty((x.shape[0], len(scales) * n_features))
    gp = params.new_empty((params.shape[0],)) if need_params_grad else params.new_empty((0,))
    gx = x.new_empty((x.shape[0], 3)) if need_x_grad else x.new_empty((0,))
    return ggy, gp, gx


@torch.library.register_fake(_LIB + "march_rays")
def _march_rays_fake(origins, directions, aabb, binary, near, far, step_size, cone_angle, max_step_size):
    n = torch.library.get_ctx().new_dynamic_size()
    return origins.new_empty((n,), dtype=torch.int64), origins.new_empty((n,)), origins.new_empty((n,))


@torch.library.register_fake(_LIB + "march_rays_fixed")
def _march_rays_fixed_fake(origins, directions, aabb, binary, near, far, step_size, cone_angle, max_step_size, capacity):
    return (origins.new_empty((capacity,), dtype=torch.int64), origins.new_empty((capacity,)),
            origins.new_empty((capacity,)), origins.new_empty((), dtype=torch.int64))


@torch.library.register_fake(_LIB + "compact_visible_samples")
def _compact_visible_samples_fake(ray_indices, t_starts, t_ends, sigmas, n_samples, n_rays, early_stop_eps,
                                  alpha_threshold, capacity):
    return (ray_indices.new_empty((capacity,)), t_starts.new_empty((capacity,)), t_starts.new_empty((capacity,)),
            ray_indices.new_empty(()))


@torch.library.register_fake(_LIB + "occupancy_update")
def _occupancy_update_fake(occupancy, indices, estimates, decay, threshold):
    return torch.empty_like(occupancy), torch.empty_like(occupancy, dtype=torch.bool)


@torch.library.register_fake(_LIB + "render_weights_fwd")
def _render_weights_fwd_fake(t_starts, t_ends, sigmas, ray_offsets):
    return torch.empty_like(sigmas), torch.empty_like(sigmas), torch.empty_like(sigmas)


@torch.library.register_fake(_LIB + "render_weights_bwd")
def _render_weights_bwd_fake(grad_weights, grad_trans, grad_alphas, t_starts, t_ends, sigmas, ray_offsets, trans,
                             alphas):
    return torch.empty_like(sigmas)


@torch.library.register_fake(_LIB + "composite_fwd")
def _composite_fwd_fake(t_starts, t_ends, ray_offsets, sigmas, albedo, normals, origins, directions, light_positions,
                        light_intensity, ambient, mode):
    r = ray_offsets.shape[0] - 1
    return (sigmas.new_empty((r, 3)), sigmas.new_empty((r, 1)), sigmas.new_empty((r, 1)), sigmas.new_empty((r, 3)),
            torch.empty_like(sigmas))


@torch.library.register_fake(_LIB + "composite_bwd")
def _composite_bwd_fake(g_rgb, g_opacity, g_depth, g_normal, g_weights, t_starts, t_ends, ray_offsets, sigmas, albedo,
                        normals, origins, directions, light_positions, light_intensity, ambient, rgb, opacity, depth,
                        normal, weights, mode, need_normals_grad):
    gn = sigmas.new_empty((sigmas.shape[0], 3)) if (need_normals_grad and normals is not None) else sigmas.new_empty((0,))
    return torch.empty_like(sigmas), sigmas.new_empty((sigmas.shape[0], 3)), gn


@torch.library.register_fake(_LIB + "orbit_cameras")
def _orbit_cameras_fake(camera_u, light_u, light_noise, lows, spans, width, height, light_perturb, wrap_azimuth):
    B = camera_u.shape[1]
    per_camera = [camera_u.new_empty(B) for _ in range(9)]
    return (camera_u.new_empty(B, 4, 4), *per_camera[:7], camera_u.new_empty(B, 3), *per_camera[7:])


@torch.library.register_fake(_LIB + "camera_rays")
def _camera_rays_fake(c2w, fx, fy, cx, cy, light_position, light_intensity, ambient, height, width):
    R = c2w.shape[0] * height * width
    return (c2w.new_empty(R, 3), c2w.new_empty(R, 3), c2w.new_empty(R, 3), c2w.new_empty(R), c2w.new_empty(R))


@torch.library.register_fake(_LIB + "frequency_encode")
def _frequency_encode_fake(x, n_frequencies):
    return x.new_empty(x.shape[0], x.shape[1] * (1 + 2 * n_frequencies))


@torch.library.register_fake(_LIB + "rasterize_fwd")
def _rasterize_fwd_fake(pos, tri, height, width):
    b = pos.shape[0]
    return (pos.new_empty((b, height, width), dtype=torch.int64), pos.new_empty((b, height, width, 2)),
            pos.new_empty((b, height, width)))


@torch.library.register_fake(_LIB + "rasterize_bwd")
def _rasterize_bwd_fake(g_bary, g_depth, pos, tri, tri_id):
    return torch.empty_like(pos)


@torch.library.register_fake(_LIB + "interpolate_fwd")
def _interpolate_fwd_fake(attr, tri_id, bary, tri):
    return attr.new_empty((*tri_id.shape, attr.shape[1]))


@torch.library.register_fake(_LIB + "interpolate_bwd")
def _interpolate_bwd_fake(g_out, attr, tri_id, bary, tri):
    return torch.empty_like(attr), attr.new_empty((*tri_id.shape, 2))


@torch.library.register_fake(_LIB + "antialias_fwd")
def _antialias_fwd_fake(color, tri_id, depth, pos, tri, adjacency):
    return torch.empty_like(color)


@torch.library.register_fake(_LIB + "antialias_bwd")
def _antialias_bwd_fake(g_out, color, tri_id, depth, pos, tri, adjacency):
    return torch.empty_like(color), pos.new_empty(pos.shape, dtype=color.dtype)


# ----------------------------------------------------------------------------- autograd formulas
def _hash_fwd_setup(ctx, inputs, output):
    x, params, scales, resolutions, offsets, hashed, n_features = inputs
    ctx.save_for_backward(x, params)
    ctx.meta = (scales, resolutions, offsets, hashed, n_features)


def _hash_fwd_backward(ctx, grad_y):
    x, params = ctx.saved_tensors
    need_x, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gp, gx = ops.hash_encode_bwd(grad_y, x, params, *ctx.meta, need_p, need_x)
    return (gx if need_x else None), (gp if need_p else None), None, None, None, None, None


def _hash_bwd_setup(ctx, inputs, output):
    grad_y, x, params, scales, resolutions, offsets, hashed, n_features, need_p, need_x = inputs
    ctx.save_for_backward(grad_y, x, params)
    ctx.meta = (scales, resolutions, offsets, hashed, n_features)
    ctx.flags = (need_p, need_x)


def _hash_bwd_backward(ctx, ggp, ggx):
    """Double backward: the first backward maps (grad_y, x, params) -> (grad_params, grad_x)."""
    grad_y, x, params = ctx.saved_tensors
    need_p, need_x = ctx.flags
    want_gy, want_x, want_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    ggy = gx2 = gp2 = None
    if need_x and ggx is not None and ggx.numel() > 0:
        ggy, gp2, gx2 = ops.hash_encode_bwd_bwd(ggx, grad_y, x, params, *ctx.meta, bool(want_p), bool(want_x))
    if need_p and ggp is not None and ggp.numel() > 0:
        # grad_params[idx_c] = sum_n w_c(x_n) grad_y_n: linear in grad_y (its adjoint is the forward
        # encoding of ggp) and differentiable in x through the weights (the x-gradient of that encoding).
        ggp_c = ggp.to(params.dtype)
        extra = ops.hash_encode_fwd(x, ggp_c, *ctx.meta)
        ggy = extra if ggy is None else ggy + extra
        if want_x:
            _, gx_extra = ops.hash_encode_bwd(grad_y, x, ggp_c, *ctx.meta, False, True)
            gx2 = gx_extra if gx2 is None else gx2 + gx_extra
    return ((ggy if want_gy else None), (gx2 if want_x else None), (gp2 if want_p else None),
            None, None, None, None, None, None, None)


torch.library.register_autograd(_LIB + "hash_encode_fwd", _hash_fwd_backward, setup_context=_hash_fwd_setup)
torch.library.register_autograd(_LIB + "hash_encode_bwd", _hash_bwd_backward, setup_context=_hash_bwd_setup)


def _rw_setup(ctx, inputs, output):
    t_starts, t_ends, sigmas, ray_offsets = inputs
    _, trans, alphas = output
    ctx.save_for_backward(t_starts, t_ends, sigmas, ray_offsets, trans, alphas)


def _rw_backward(ctx, gw, gt, ga):
    t_starts, t_ends, sigmas, ray_offsets, trans, alphas = ctx.saved_tensors
    grad_s = ops.render_weights_bwd(gw, gt, ga, t_starts, t_ends, sigmas, ray_offsets, trans, alphas)
    g_start = g_end = g_sigma = None
    if ctx.needs_input_grad[2]:
        g_sigma = grad_s * (t_ends - t_starts)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        g_end = grad_s * sigmas
        g_start = -g_end
    return g_start, g_end, g_sigma, None


torch.library.register_autograd(_LIB + "render_weights_fwd", _rw_backward, setup_context=_rw_setup)


def _comp_setup(ctx, inputs, output):
    (t_starts, t_ends, ray_offsets, sigmas, albedo, normals, origins, directions, light_positions, light_intensity,
     ambient, mode) = inputs
    rgb, opacity, depth, normal, weights = output
    ctx.has_normals = normals is not None
    ctx.mode = mode
    ctx.save_for_backward(t_starts, t_ends, ray_offsets, sigmas, albedo, normals if normals is not None else sigmas,
                          origins, directions, light_positions, light_intensity, ambient, rgb, opacity, depth, normal,
                          weights)


def _comp_backward(ctx, g_rgb, g_opacity, g_depth, g_normal, g_weights):
    (t_starts, t_ends, ray_offsets, sigmas, albedo, normals, origins, directions, light_positions, light_intensity,
     ambient, rgb, opacity, depth, normal, weights) = ctx.saved_tensors
    normals = normals if ctx.has_normals else None
    g_rgb = torch.zeros_like(rgb) if g_rgb is None else g_rgb
    g_opacity = torch.zeros_like(opacity) if g_opacity is None else g_opacity
    g_depth = torch.zeros_like(depth) if g_depth is None else g_depth
    g_normal = torch.zeros_like(normal) if g_normal is None else g_normal
    need_n = bool(ctx.has_normals and ctx.needs_input_grad[5])
    gs, ga, gn = ops.composite_bwd(g_rgb, g_opacity, g_depth, g_normal, g_weights, t_starts, t_ends, ray_offsets, sigmas,
                                   albedo, normals, origins, directions, light_positions, light_intensity, ambient, rgb,
                                   opacity, depth, normal, weights, ctx.mode, need_n)
    return (None, None, None, gs if ctx.needs_input_grad[3] else None, ga if ctx.needs_input_grad[4] else None,
            gn if need_n else None, None, None, None, None, None, None)


torch.library.register_autograd(_LIB + "composite_fwd", _comp_backward, setup_context=_comp_setup)


def _raster_setup(ctx, inputs, output):
    pos, tri, _, _ = inputs
    ctx.mark_non_differentiable(output[0])
    ctx.save_for_backward(pos, tri, output[0])


def _raster_backward(ctx, _g_id, g_bary, g_depth):
    pos, tri, tri_id = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    g_bary = torch.zeros((*tri_id.shape, 2), dtype=pos.dtype, device=pos.device) if g_bary is None else g_bary
    g_depth = torch.zeros(tri_id.shape, dtype=pos.dtype, device=pos.device) if g_depth is None else g_depth
    return ops.rasterize_bwd(g_bary, g_depth, pos, tri, tri_id), None, None, None


torch.library.register_autograd(_LIB + "rasterize_fwd", _raster_backward, setup_context=_raster_setup)


def _interp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _interp_backward(ctx, g_out):
    attr, tri_id, bary, tri = ctx.saved_tensors
    g_attr, g_bary = ops.interpolate_bwd(g_out, attr, tri_id, bary, tri)
    return (g_attr if ctx.needs_input_grad[0] else None, None,
            g_bary.to(bary.dtype) if ctx.needs_input_grad[2] else None, None)


torch.library.register_autograd(_LIB + "interpolate_fwd", _interp_backward, setup_context=_interp_setup)


def _aa_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _aa_backward(ctx, g_out):
    color, tri_id, depth, pos, tri, adjacency = ctx.saved_tensors
    g_color, g_pos = ops.antialias_bwd(g_out, color, tri_id, depth, pos, tri, adjacency)
    return (g_color if ctx.needs_input_grad[0] else None, None, None,
            g_pos.to(pos.dtype) if ctx.needs_input_grad[3] else None, None, None)


torch.library.register_autograd(_LIB + "antialias_fwd", _aa_backward, setup_context=_aa_setup)


# ----------------------------------------------------------------------------- public functions
def layout_args(layout: HashGridLayout):
    """The layout as the op's list arguments (scales, resolutions, offsets, hashed, n_features)."""
    return (list(layout.scales), list(layout.resolutions), list(layout.offsets), [int(h) for h in layout.hashed],
            layout.n_features_per_level)


def hash_encode(x: torch.Tensor, params: torch.Tensor, layout: HashGridLayout) -> torch.Tensor:
    """Native twin of hash_encode_reference (same dtype rules: float64 if x or params is, else float32)."""
    double = x.dtype == torch.float64 or params.dtype == torch.float64
    compute = torch.float64 if double else torch.float32
    xc = x.to(compute)
    if double:
        pc = params.to(torch.float64)
    else:
        pc = params if params.dtype in (torch.float32, torch.float16) else params.to(torch.float32)
    out = ops.hash_encode_fwd(xc, pc, *layout_args(layout))
    return out.to(params.dtype if params.dtype != torch.float16 else torch.float32)


def ray_offsets(ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """(n_rays + 1,) start of each ray's samples in the packed arrays (ray_indices sorted)."""
    bounds = torch.arange(n_rays + 1, device=ray_indices.device, dtype=ray_indices.dtype)
    return torch.searchsorted(ray_indices.contiguous(), bounds).to(torch.int64)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def render_weights(t_starts, t_ends, sigmas, ray_indices, n_rays: int):
    check_packed(t_starts, t_ends, sigmas, ray_indices, "render_weights")
    dt = _compute_dtype(sigmas)
    off = ray_offsets(ray_indices, n_rays)
    return ops.render_weights_fwd(t_starts.to(dt), t_ends.to(dt), sigmas.to(dt), off)


def march_rays(origins, directions, aabb, binary, near: float, far: float, step_size: float,
               cone_angle: float = 0.0, max_step_size: float = 1e10):
    check_march_inputs(origins, directions, aabb, binary)
    check(step_size > 0, f"march: step_size must be > 0, got {step_size}")
    if origins.dtype not in (torch.float32, torch.float64):
        origins = origins.float()
    return ops.march_rays(origins, directions.to(origins.dtype), aabb, binary, float(near), float(far),
                          float(step_size), float(cone_angle), float(max_step_size))


def march_rays_fixed(origins, directions, aabb, binary, near: float, far: float, step_size: float,
                     cone_angle: float, max_step_size: float, capacity: int):
    check_march_inputs(origins, directions, aabb, binary)
    check(step_size > 0, f"march: step_size must be > 0, got {step_size}")
    check(capacity >= 0, f"march: capacity must be >= 0, got {capacity}")
    if origins.dtype not in (torch.float32, torch.float64):
        origins = origins.float()
    return ops.march_rays_fixed(origins, directions.to(origins.dtype), aabb, binary, float(near), float(far),
                                float(step_size), float(cone_angle), float(max_step_size), int(capacity))


def compact_visible_samples(ray_indices, t_starts, t_ends, sigmas, n_samples: Optional[torch.Tensor], n_rays: int,
                            early_stop_eps: float, alpha_threshold: float, capacity: int):
    """See ops.pruning.compact_visible_samples_reference."""
    check_compact_inputs(ray_indices, t_starts, t_ends, sigmas, n_samples, n_rays, capacity)
    return ops.compact_visible_samples(ray_indices, t_starts, t_ends, sigmas, n_samples, int(n_rays),
                                       float(early_stop_eps), float(alpha_threshold), int(capacity))


def occupancy_update(occupancy: torch.Tensor, indices: torch.Tensor, estimates: torch.Tensor, decay: float,
                     threshold: float):
    """See ops.marching.occupancy_update_reference."""
    check_occupancy_update_inputs(occupancy, indices, estimates)
    return ops.occupancy_update(occupancy, indices, estimates.to(occupancy.dtype), float(decay), float(threshold))


def orbit_cameras(camera_u, light_u, light_noise, lows, spans, width: int, height: int, light_perturb: float,
                  wrap_azimuth: bool):
    """See ops.cameras.orbit_cameras_reference."""
    check_orbit_inputs(camera_u, light_u, light_noise, lows, spans)
    return ops.orbit_cameras(camera_u, light_u, light_noise, lows, spans, int(width), int(height), float(light_perturb),
                             bool(wrap_azimuth))


def camera_rays(c2w, fx, fy, cx, cy, light_position, light_intensity, ambient, height: int, width: int):
    """See ops.cameras.camera_rays_reference."""
    check_camera_rays_inputs(c2w, fx, fy, cx, cy, light_position, light_intensity, ambient, height, width)
    return ops.camera_rays(c2w, fx, fy, cx, cy, light_position, light_intensity, ambient, int(height), int(width))


def frequency_encode(x: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """See ops.frequency_encoding.frequency_encode_reference."""
    check_frequency_encode_inputs(x, n_frequencies)
    return ops.frequency_encode(x, int(n_frequencies))


def _per_ray(v, n_rays: int, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.expand(n_rays).contiguous() if v.numel() == 1 and n_rays != 1 else v.reshape(-1)


def composite(t_starts, t_ends, ray_indices, n_rays: int, sigmas, albedo, normals: Optional[torch.Tensor],
              origins, directions, light_positions, light_intensity, ambient, mode: str):
    code = shading_code(mode)
    check_packed(t_starts, t_ends, sigmas, ray_indices, "composite")
    unsupported = [t for t in (t_starts, t_ends, origins, directions, light_positions, light_intensity, ambient)
                   if isinstance(t, torch.Tensor) and t.requires_grad]
    if unsupported and torch.is_grad_enabled():
        # the fused kernel differentiates w.r.t. sigmas, albedo and normals only
        return composite_reference(t_starts, t_ends, ray_indices, n_rays, sigmas, albedo, normals, origins, directions,
                                   light_positions, light_intensity, ambient, mode)
    check(code == 0 or normals is not None, f"composite: mode {mode!r} needs normals")
    dt = _compute_dtype(sigmas)
    off = ray_offsets(ray_indices, n_rays)
    rgb, opacity, depth, normal, weights = ops.composite_fwd(
        t_starts.to(dt), t_ends.to(dt), off, sigmas.to(dt), albedo.to(dt), None if normals is None else normals.to(dt),
        origins.to(dt), directions.to(dt), light_positions.to(dt), _per_ray(light_intensity, n_rays, sigmas.to(dt)),
        _per_ray(ambient, n_rays, sigmas.to(dt)), code)
    return rgb, opacity, depth, normal, weights


def rasterize(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int):
    check_mesh_inputs(pos, tri)
    return ops.rasterize_fwd(pos.to(_compute_dtype(pos)), tri, int(height), int(width))


def interpolate(attr: torch.Tensor, tri_id: torch.Tensor, bary: torch.Tensor, tri: torch.Tensor):
    return ops.interpolate_fwd(attr.to(_compute_dtype(attr)), tri_id, bary, tri)


def antialias(color: torch.Tensor, tri_id: torch.Tensor, depth: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
              topology: Optional[torch.Tensor] = None):
    """topology: triangle_adjacency(tri) (computed here when None)."""
    check_mesh_inputs(pos, tri)
    if topology is None:
        topology = triangle_adjacency(tri)
    check_topology(topology, tri)
    return ops.antialias_fwd(color.to(_compute_dtype(color)), tri_id, depth, pos, tri, topology)
