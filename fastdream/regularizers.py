"""Geometry regularisers of DreamFusion.

Orientation loss (DreamFusion, eq. in appendix): normals that face away from the camera while being
visible produce dark, "hollow" shading; penalise them per sample,

    L_orient = sum_i stop_grad(w_i) * max(0, n_i . d)^2

with w_i the rendering weight of sample i, n_i its normal and d the ray direction (pointing from the
camera into the scene, so a visible front-facing normal has n . d < 0). Summed over the samples of
each ray and divided by the number of rays that see anything (opacity > 0), as threestudio does
(``systems/dreamfusion.py``), so the term does not shrink when the object covers less of the image.

Opacity regularisers on the accumulated per-ray opacity a:
  entropy   mean over rays of -(a log a + (1-a) log(1-a)): pushes rays to be empty or opaque;
  sparsity  mean sqrt(a^2 + 0.01) (DreamFusion): penalises the foreground area.

Distortion loss (mip-NeRF 360, eq. 15; nerfacc's ``distortion``), on the samples of each ray, intervals
[t0_i, t1_i] with midpoints m_i and weights w_i:

    L_dist = sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 (t1_i - t0_i)

It is small when a ray's weight sits in one short stretch, so it removes the semi-transparent haze
("floaters") with which a field can explain each training view separately. Computed in O(N) with prefix
sums along each ray (samples are packed ray by ray, in order of t), averaged over the rays.

Near-camera gradient scaling ("Floaters No More", Philip & Deschaintre 2023; nerfstudio's
``scale_gradients_by_distance_squared``): a sample at distance t from its camera is seen by many pixels of that
camera when t is small, so its gradient is oversized and the field explains each training view with haze in
front of its camera. During training the gradient reaching each sample's outputs (density, colour, normal)
is multiplied by min(1, (t / d)^2), the forward pass unchanged. d is a distance of the scene's scale
(`fastdream fit` takes a fraction of the cameras' distance to the scene).

Mesh regularisers (the mesh stage; nvdiffrec's and threestudio's ``magic3d-refine`` / Fantasia3D terms), on a
triangle mesh (verts (V, 3), faces (F, 3)):
  normal consistency    mean over the edges shared by two faces of 1 - cos(angle between their normals);
  Laplacian smoothness  mean over the vertices of |deg(v) v - sum of its neighbours| (the uniform Laplacian,
                        unnormalised, as threestudio's ``laplacian_smooth_loss``).

Weights over training (``ramp``): a weight may move linearly from a start to an end value over the
first fraction of the steps, then stay there (threestudio writes ``[start_step, start, end, end_step]``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import ops


def ramp(start: float, end: float, progress: float, fraction: float) -> float:
    """A weight going linearly from ``start`` (progress 0) to ``end`` (progress ``fraction``), then ``end``."""
    if fraction <= 0:
        return end
    p = min(max(progress / fraction, 0.0), 1.0)
    return start + (end - start) * p


class OrientationLoss(torch.autograd.Function):
    """``apply(normals (N,3), weights (N,), directions (R,3), ray_indices (N,), opacity (R,))``: the orientation loss
    sum_i w_i max(0, n_i . d_i)^2 / (number of rays with opacity > 0, at least 1), differentiable in the normals
    only (the weights are stop-gradient, the directions and opacity constants). One node with a four-op backward,
    2 w_i max(0, n_i . d_i) d_i / count; as autograd expressions the same loss costs three times the ops."""

    @staticmethod
    def forward(ctx, normals, weights, directions, ray_indices, opacity):
        ray_directions = directions[ray_indices]
        facing = (normals * ray_directions).sum(-1).clamp_min_(0.0)
        count = torch.count_nonzero(opacity).clamp_min(1)  # opacity >= 0: its nonzero entries see anything
        weighted = weights * facing / count
        ctx.save_for_backward(weighted, ray_directions)
        return torch.dot(weighted, facing)

    @staticmethod
    def backward(ctx, grad):
        weighted, ray_directions = ctx.saved_tensors
        return ray_directions * (weighted * (grad * 2.0)).unsqueeze(1), None, None, None, None


class OpacityTerms(torch.autograd.Function):
    """``apply(opacity (R,), eps)``: the opacity regularisers (entropy, sparsity), two scalars: means over the rays
    of the binary entropy of clamp(a, eps, 1 - eps) and of sqrt(a^2 + 0.01). One node for both, whose backward is
    d entropy / da = log((1 - a) / a) inside the clamp (0 outside) and d sparsity / da = a / sqrt(a^2 + 0.01)."""

    @staticmethod
    def forward(ctx, opacity, eps):
        a = opacity.clamp(eps, 1.0 - eps)
        rest = 1.0 - a
        entropy = torch.special.entr(a) + torch.special.entr(rest)  # entr(x) = -x log x
        sparsity = torch.hypot(opacity, opacity.new_full((), 0.1))
        ctx.save_for_backward(opacity, a, rest, sparsity)
        return entropy.mean(), sparsity.mean()

    @staticmethod
    def backward(ctx, g_entropy, g_sparsity):
        opacity, a, rest, sparsity = ctx.saved_tensors
        d_entropy = torch.logit(rest).mul_(g_entropy).masked_fill_(a != opacity, 0.0)  # logit(1-a) = log((1-a)/a)
        return torch.addcmul(d_entropy, opacity / sparsity, g_sparsity).div_(opacity.shape[0]), None  # of means


def orientation_loss(weights: torch.Tensor, normals: Optional[torch.Tensor], directions: torch.Tensor,
                     ray_indices: torch.Tensor, n_rays: Optional[int] = None,
                     opacity: Optional[torch.Tensor] = None) -> torch.Tensor:
    """weights (N,), normals (N,3) or None, directions (R,3) per ray, ray_indices (N,) -> scalar.

    Divided by the number of rays with opacity > 0 when ``opacity`` (R,) is given (a device-side count,
    no host sync), else by ``n_rays`` (all rays)."""
    if normals is None or weights.numel() == 0:
        return directions.new_zeros(())
    if opacity is not None:
        return OrientationLoss.apply(normals, weights, directions, ray_indices, opacity)
    facing = (normals * directions[ray_indices]).sum(-1).clamp_min(0.0)
    total = torch.dot(weights.detach(), facing.square())
    n_rays = directions.shape[0] if n_rays is None else n_rays
    return total / max(n_rays, 1)


def opacity_terms(opacity: torch.Tensor, eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """(entropy, sparsity) of the per-ray opacity (R,) (see OpacityTerms)."""
    return OpacityTerms.apply(opacity, eps)


def opacity_entropy(opacity: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    a = opacity.clamp(eps, 1.0 - eps)
    return (torch.special.entr(a) + torch.special.entr(1.0 - a)).mean()  # entr(x) = -x log x


def opacity_sparsity(opacity: torch.Tensor) -> torch.Tensor:
    return torch.hypot(opacity, opacity.new_full((), 0.1)).mean()  # sqrt(a^2 + 0.01)


def distortion_loss(weights: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor,
                    n_rays: int) -> torch.Tensor:
    """weights, t_starts, t_ends, ray_indices (N,) packed ray by ray in order of t -> the mean over n_rays of
    the per-ray distortion loss (module docstring). Zero-weight padding slots may follow the samples."""
    if weights.numel() == 0:
        return weights.new_zeros(())
    mid = 0.5 * (t_starts + t_ends)
    # sum_ij w_i w_j |m_i - m_j| = 2 sum_i w_i (m_i W_i - WM_i), W_i and WM_i the sums of w_j and w_j m_j over
    # the samples j before i on its ray: global exclusive prefix sums minus their value at the ray's first sample
    # (float64 against cancellation in the long global sums).
    pair = torch.stack([weights, weights * mid], dim=-1).double()
    before = torch.cumsum(pair, dim=0) - pair
    position = torch.arange(weights.shape[0], device=weights.device)
    first = torch.full((n_rays,), weights.shape[0], device=weights.device, dtype=torch.long)
    first = first.scatter_reduce(0, ray_indices.long(), position, reduce="amin")
    before = (before - before[first[ray_indices.long()]]).to(weights.dtype)
    inter = 2.0 * (weights * (mid * before[:, 0] - before[:, 1])).sum()
    intra = (weights.square() * (t_ends - t_starts)).sum() / 3.0
    return (inter + intra) / max(n_rays, 1)


class NearGradientScale(torch.autograd.Function):
    """Identity forward; backward scales each sample's gradient by min(1, (t_mid / distance)^2)."""

    @staticmethod
    def forward(ctx, t_starts, t_ends, distance: float, *outputs):
        ctx.save_for_backward(t_starts, t_ends)
        ctx.distance = distance
        return tuple(x.view_as(x) for x in outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        t_starts, t_ends = ctx.saved_tensors
        scale = torch.add(t_starts, t_ends).mul_(0.5 / ctx.distance).square_().clamp_(max=1.0)
        scaled = tuple(None if g is None else g * (scale if g.dim() == 1 else scale[:, None]) for g in grads)
        return (None, None, None, *scaled)


def scale_gradients_near_camera(t_starts: torch.Tensor, t_ends: torch.Tensor, distance: float, *outputs):
    """The per-sample outputs (N,) or (N, C) unchanged, their gradients scaled by min(1, (t / distance)^2) with t
    each sample's midpoint distance along its (unit-direction) ray. Outputs that are None pass through."""
    present = [x for x in outputs if x is not None]
    scaled = iter(NearGradientScale.apply(t_starts, t_ends, float(distance), *present))
    return tuple(None if x is None else next(scaled) for x in outputs)


def per_ray_orientation(weights, normals, directions, ray_indices) -> torch.Tensor:
    """The orientation penalty of every ray (R,), for diagnostics."""
    facing = (normals * directions[ray_indices]).sum(-1).clamp_min(0.0)
    return ops.accumulate_along_rays(weights.detach(), facing.pow(2)[:, None], ray_indices=ray_indices,
                                     n_rays=directions.shape[0])[:, 0]


def _edge_keys(faces: torch.Tensor, n_verts: int) -> torch.Tensor:
    """(3F,) key lo * V + hi of every face's edges (v0v1, v1v2, v2v0), face-major."""
    a = faces
    b = faces.roll(-1, dims=1)
    return (torch.minimum(a, b) * n_verts + torch.maximum(a, b)).reshape(-1)


def normal_consistency(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - n_f . n_g over the pairs of faces (f, g) that share an edge (scalar; zero without any).
    Edges on a boundary are skipped; at an edge shared by more than two faces, faces next to each other in
    the edge's list are paired."""
    if faces.shape[0] == 0:
        return verts.new_zeros(())
    v0, v1, v2 = (verts[faces[:, i]] for i in range(3))
    normal = torch.nn.functional.normalize(torch.linalg.cross(v1 - v0, v2 - v0, dim=-1), dim=-1, eps=1e-20)
    with torch.no_grad():
        keys = _edge_keys(faces, verts.shape[0])
        order = torch.argsort(keys, stable=True)
        sorted_keys = keys[order]
        pair = (sorted_keys[1:] == sorted_keys[:-1]).nonzero()[:, 0]
        f, g = order[pair] // 3, order[pair + 1] // 3
    if f.numel() == 0:
        return verts.new_zeros(())
    cos = (normal[f] * normal[g]).sum(-1).clamp(-1.0, 1.0)
    return (1.0 - cos).mean()


def laplacian_smoothness(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean over the vertices of the norm of the uniform Laplacian deg(v) v - sum of v's neighbours (scalar)."""
    if faces.shape[0] == 0:
        return verts.new_zeros(())
    with torch.no_grad():
        n = verts.shape[0]
        keys = torch.unique(_edge_keys(faces, n))
        a, b = keys // n, keys % n
        src, dst = torch.cat([a, b]), torch.cat([b, a])
        degree = torch.zeros(n, dtype=verts.dtype, device=verts.device).index_add_(
            0, src, torch.ones_like(src, dtype=verts.dtype))
    neighbours = torch.zeros_like(verts).index_add(0, src, verts[dst])
    return torch.linalg.vector_norm(degree[:, None] * verts - neighbours, dim=-1).mean()
