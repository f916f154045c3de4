"""The per-point ops around the field's MLP, as plain PyTorch: the fallback and the oracle of
csrc/kernels/field_impl.h.

- ray_points: the midpoint of each packed sample's interval on its ray, where the field is queried.
- probe_points: the hash-grid input (the box mapped to [0, 1]^3, clamped) of points and, with k = 7, of their
  six finite-difference probes: each point, then the point moved by `step` along +x +y +z -x -y -z.
- field_head: the field's output head on the MLP's raw output (k rows of four values a point, in
  probe_points' order): density = activation(raw density + density_bias + the blob around the box centre),
  albedo = sigmoid(raw albedo) of the point itself and, with k = 7, unit normals
  normalize(sigma(-probes) - sigma(+probes)) (-grad sigma, its positive 1 / (2 step) cancelled).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import check

PROBES = 7
BLOB_SHAPES = ("linear", "gaussian")
ACTIVATIONS = ("exp", "softplus")
EXP_CLAMP = 15.0  # instant-ngp's truncated exp: exp(min(pre, 15)), gradient exp(clamp(pre, -15, 15))


class TruncExp(torch.autograd.Function):
    """exp whose gradient is clamped, so large pre-activations do not explode (instant-ngp's trick)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(-EXP_CLAMP, EXP_CLAMP))


def check_probe_count(k: int) -> None:
    check(k in (1, PROBES), f"field ops: k (points per query point) must be 1 or {PROBES}, got {k}")


def probe_offsets(step: float, like: torch.Tensor) -> torch.Tensor:
    """(7, 3): zero, then step along +x +y +z -x -y -z."""
    eye = torch.eye(3, dtype=like.dtype, device=like.device)
    return torch.cat([torch.zeros_like(eye[:1]), eye, -eye]) * step


def with_probes(x: torch.Tensor, step: float, k: int) -> torch.Tensor:
    """(N * k, 3): x alone (k = 1) or each point followed by its six probes (k = 7)."""
    return x if k == 1 else (x[:, None, :] + probe_offsets(step, x)).reshape(-1, 3)


def ray_points_reference(t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor,
                         origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    return origins[ray_indices] + directions[ray_indices] * ((t_starts + t_ends) * 0.5)[:, None]


def probe_points_reference(x: torch.Tensor, unit_scale: torch.Tensor, unit_offset: torch.Tensor, step: float,
                           k: int) -> torch.Tensor:
    return torch.addcmul(unit_offset, with_probes(x, step, k), unit_scale).clamp_(0.0, 1.0)


def density_from_raw(raw_density: torch.Tensor, points: torch.Tensor, centre: torch.Tensor, *, density_bias: float,
                     blob_density: float, blob_radius: float, blob_shape: str, activation: str) -> torch.Tensor:
    """Density (M,) at points (M, 3) from the MLP's raw density (M,); differentiable w.r.t. both."""
    pre = raw_density
    if density_bias != 0:
        pre = pre + density_bias
    if blob_density > 0:
        if blob_shape == "linear":  # blob_density * (1 - r / radius), r's gradient 0 at the centre
            r = torch.linalg.vector_norm(points - centre, dim=-1)
            pre = torch.add(pre, r, alpha=-blob_density / blob_radius).add_(blob_density)
        else:
            r2 = ((points - centre) ** 2).sum(-1)
            pre = pre + blob_density * torch.exp(-r2 / (2 * blob_radius * blob_radius))
    if activation == "exp":
        return TruncExp.apply(pre.clamp_max(EXP_CLAMP))
    return F.softplus(pre)


def normals_from_probes(probes: torch.Tensor, step: float) -> torch.Tensor:
    """Unit normals (N, 3) from the densities (N, 6) at the probes +x +y +z -x -y -z."""
    plus, minus = probes.view(-1, 2, 3).unbind(1)
    # normalize(-grad) with grad = (sig+ - sig-) / (2 step): the positive factor 1 / (2 step) cancels
    return F.normalize(minus - plus, dim=-1, eps=1e-12 * 2 * step)


def field_head_reference(raw: torch.Tensor, x: torch.Tensor, centre: torch.Tensor, *, k: int, step: float,
                         density_bias: float, blob_density: float, blob_radius: float, blob_shape: str,
                         activation: str, with_albedo: bool = True
                         ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    blob = dict(density_bias=density_bias, blob_density=blob_density, blob_radius=blob_radius,
                blob_shape=blob_shape, activation=activation)
    sigmas = density_from_raw(raw[:, 0], with_probes(x, step, k), centre, **blob)
    albedo = torch.sigmoid(raw[::k, 1:]) if with_albedo else None
    if k == 1:
        return sigmas, albedo, None
    sigma, probes = sigmas.view(-1, PROBES).split([1, PROBES - 1], dim=-1)
    return sigma.squeeze(-1), albedo, normals_from_probes(probes, step)
