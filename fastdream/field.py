"""The radiance field: hash-grid encoding -> tiny MLP -> density and albedo; plus a background model.

DreamFusion's field is view-independent: it outputs density and an albedo, shading is done by the
renderer from normals = -grad(density)/|grad(density)|. A "blob" of pre-activation density is added
around the centre so that optimisation starts from an object rather than empty space.

The blob's default is threestudio's DreamFusion recipe (``configs/dreamfusion-sd.yaml``:
``density_bias: blob_magic3d``, scale 10, std 0.5): linear in the distance r from the centre,
``blob_density * (1 - r / (blob_radius * R))``. It is positive inside blob_radius and negative
outside, so space away from the centre starts transparent: at initialisation the corners of every
training image show the background (which therefore receives gradients from the first step). The
Gaussian shape (``blob_shape="gaussian"``, stable-dreamfusion's ``density_blob``, its defaults 5 and
0.2) only adds density, so with the exp activation the untrained field keeps density ~1 everywhere
and most of each image is opaque at initialisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import ops
from .errors import check
from .fused_mlp import mlp_forward


@dataclass
class FieldConfig:
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 2048          # finest level, sets tcnn's per_level_scale
    hidden_dim: int = 64
    n_hidden_layers: int = 2
    density_activation: str = "exp"     # "exp" (truncated exp, as instant-ngp) or "softplus"
    blob_density: float = 10.0          # pre-activation density added at the centre (0 disables)
    blob_radius: float = 0.5            # in units of the scene radius (linear: where the bias crosses 0)
    blob_shape: str = "linear"          # "linear" (threestudio's DreamFusion) or "gaussian" (stable-dreamfusion)
    # Constant pre-activation density added everywhere (threestudio's float density_bias). Negative values
    # make the untrained field transparent, so space no ray constrains stays below the occupancy threshold.
    density_bias: float = 0.0
    # Bias terms in the MLP. Without them (tiny-cuda-nn's fully fused MLP has none) a point whose hash
    # features are still at their ~0 initialisation keeps density exp(density_bias) for good, instead of
    # following a shared output bias that training on the seen part of the scene drives up.
    mlp_bias: bool = True
    normals: str = "finite_difference"  # or "analytic" (autograd through the encoding)
    normal_epsilon: float = 0.01        # finite-difference step, in units of the scene radius
    init_scale: float = 1e-4            # hash table initialised uniformly in [-s, s], as tiny-cuda-nn
    # Progressive levels (coarse first): only the first `progressive_start_levels` levels feed the MLP at
    # the start, one more level joins every `progressive_every` of training (a fraction of the steps).
    # Off by default, as in both peers (threestudio's ProgressiveBandHashGrid: start_level 8, one level
    # every 500 steps; stable-dreamfusion's --progressive_level).
    progressive_start_levels: int = 0   # 0: off (every level from the start)
    progressive_every: float = 0.05

    @property
    def per_level_scale(self) -> float:
        return ops.default_per_level_scale(self.n_levels, self.base_resolution, self.max_resolution)


class TruncExp(torch.autograd.Function):
    """exp whose gradient is clamped, so large pre-activations do not explode (instant-ngp's trick)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(-15, 15))


def _mlp(in_dim: int, hidden: int, n_hidden: int, out_dim: int, bias: bool = True) -> nn.Sequential:
    layers, dim = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(dim, hidden, bias=bias), nn.ReLU(inplace=True)]
        dim = hidden
    layers.append(nn.Linear(dim, out_dim, bias=bias))
    return nn.Sequential(*layers)


class HashGridField(nn.Module):
    def __init__(self, aabb=(-1.0, -1.0, -1.0, 1.0, 1.0, 1.0), config: Optional[FieldConfig] = None):
        super().__init__()
        self.config = cfg = config or FieldConfig()
        check(cfg.density_activation in ("exp", "softplus"), f"density_activation must be 'exp' or 'softplus', got {cfg.density_activation!r}")
        check(cfg.blob_shape in ("linear", "gaussian"), f"blob_shape must be 'linear' or 'gaussian', got {cfg.blob_shape!r}")
        check(cfg.normals in ("finite_difference", "analytic"), f"normals must be 'finite_difference' or 'analytic', got {cfg.normals!r}")
        aabb = torch.as_tensor(aabb, dtype=torch.float32).reshape(-1)
        check(aabb.shape == (6,) and bool((aabb[3:] > aabb[:3]).all()), f"field aabb must be (xmin, ymin, zmin, xmax, ymax, zmax), got {aabb.tolist()}")
        self.register_buffer("aabb", aabb)
        self.register_buffer("probe_directions", torch.cat([torch.zeros(1, 3), torch.eye(3), -torch.eye(3)]),
                             persistent=False)
        self._cache_box()
        # the box is a buffer (a checkpoint may bring another): refresh the host copies after loading
        self.register_load_state_dict_post_hook(lambda module, keys: module._cache_box())
        self.encoding_kwargs = dict(n_levels=cfg.n_levels, n_features_per_level=cfg.n_features_per_level,
                                    log2_hashmap_size=cfg.log2_hashmap_size, base_resolution=cfg.base_resolution,
                                    per_level_scale=cfg.per_level_scale)
        n_params = ops.hash_grid_n_params(**self.encoding_kwargs)
        self.encoding_params = nn.Parameter(torch.empty(n_params).uniform_(-cfg.init_scale, cfg.init_scale))
        self.mlp = _mlp(cfg.n_levels * cfg.n_features_per_level, cfg.hidden_dim, cfg.n_hidden_layers, 4, cfg.mlp_bias)
        self.active_levels = cfg.n_levels  # progressive levels: set by set_progress during training

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (host float): how many hash levels feed the MLP."""
        cfg = self.config
        if cfg.progressive_start_levels <= 0:
            return
        extra = int(progress / cfg.progressive_every) if cfg.progressive_every > 0 else cfg.n_levels
        self.active_levels = min(cfg.n_levels, cfg.progressive_start_levels + extra)

    def _cache_box(self) -> None:
        # Host copies of the box's sizes: reading them from the buffer every step would sync with the GPU.
        size = self.aabb[3:] - self.aabb[:3]
        self._scene_radius = float(size.max()) / 2
        self._diagonal = float(torch.linalg.vector_norm(size))
        # Derived device constants, so a query does not recompute them (a handful of small ops each time):
        # unit = x * unit_scale + unit_offset maps the box to [0, 1]^3.
        for name, value in (("unit_scale", 1.0 / size), ("unit_offset", -self.aabb[:3] / size),
                            ("box_centre", (self.aabb[:3] + self.aabb[3:]) / 2)):
            if name in self._buffers:
                self._buffers[name] = value
            else:
                self.register_buffer(name, value, persistent=False)

    @property
    def scene_radius(self) -> float:
        return self._scene_radius

    @property
    def diagonal(self) -> float:
        """Length of the box's diagonal (a host float)."""
        return self._diagonal

    @property
    def centre(self) -> torch.Tensor:
        return self.box_centre

    def mlp_parameters(self):
        return self.mlp.parameters()

    def _raw(self, x: torch.Tensor, detach_grid: bool = False, fused_mlp: bool = True) -> torch.Tensor:
        unit = torch.addcmul(self.unit_offset, x, self.unit_scale).clamp_(0.0, 1.0)
        params = self.encoding_params.detach() if detach_grid else self.encoding_params
        features = ops.hash_encode(unit, params, check_range=False, **self.encoding_kwargs)
        if self.active_levels < self.config.n_levels:  # later (finer) levels masked out: no signal, no gradient
            keep = self.active_levels * self.config.n_features_per_level
            features = torch.cat([features[:, :keep], torch.zeros_like(features[:, keep:])], dim=1)
        features = features.to(self.mlp[0].weight.dtype)
        return mlp_forward(self.mlp, features) if fused_mlp else self.mlp(features)

    def _density_from_raw(self, x: torch.Tensor, raw_density: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        pre = raw_density
        if cfg.density_bias != 0:
            pre = pre + cfg.density_bias
        if cfg.blob_density > 0:
            radius = cfg.blob_radius * self.scene_radius
            if cfg.blob_shape == "linear":  # blob_density * (1 - r / radius), r's gradient 0 at the centre
                r = torch.linalg.vector_norm(x - self.box_centre, dim=-1)
                pre = torch.add(pre, r, alpha=-cfg.blob_density / radius).add_(cfg.blob_density)
            else:
                r2 = ((x - self.box_centre) ** 2).sum(-1)
                pre = pre + cfg.blob_density * torch.exp(-r2 / (2 * radius * radius))
        if cfg.density_activation == "exp":
            return TruncExp.apply(pre.clamp_max(15.0))
        return F.softplus(pre)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Volumetric density sigma >= 0 at world points x (N, 3) -> (N,)."""
        return self._density_from_raw(x, self._raw(x)[:, 0])

    def query(self, x: torch.Tensor, need_normals: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Density (N,), albedo (N,3) in [0,1] and, if asked, unit normals (N,3) pointing out of the surface."""
        if need_normals and self.config.normals == "analytic":
            graph = torch.is_grad_enabled() and self.training
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                # Without a graph only d(sigma)/dx is wanted: a detached hash grid keeps the backward from
                # computing (zeroing, scattering) a grid-sized parameter gradient autograd.grad would drop.
                raw = self._raw(xg, detach_grid=not graph, fused_mlp=not graph)  # a graph: differentiated twice
                sigma = self._density_from_raw(xg, raw[:, 0])
                grad = torch.autograd.grad(sigma.sum(), xg, create_graph=graph)[0]
            normals = F.normalize(-grad, dim=-1, eps=1e-12)
            if not graph:
                sigma, raw = sigma.detach(), raw.detach()
            return sigma, torch.sigmoid(raw[:, 1:]), normals
        if not need_normals:
            raw = self._raw(x)
            density, albedo_raw = raw.split([1, 3], dim=-1)
            return self._density_from_raw(x, density.squeeze(-1)), torch.sigmoid(albedo_raw), None
        # Finite differences: x and its six probes go through one encoding, MLP and activation (one set of
        # ops, and one backward, instead of two).
        points = (x[:, None, :] + self._probe_offsets(x.dtype)).reshape(-1, 3)  # (7N, 3): x, then its probes
        raw = self._raw(points).view(-1, 7, 4)
        density, albedo_raw = raw.split([1, 3], dim=-1)
        sigmas = self._density_from_raw(points, density.reshape(-1)).view(-1, 7)
        sigma, probes = sigmas.split([1, 6], dim=-1)
        return sigma.squeeze(-1), torch.sigmoid(albedo_raw[:, 0]), self._normals_from_probes(probes)

    def _probe_offsets(self, dtype: torch.dtype) -> torch.Tensor:
        """(7, 3): zero, then the finite-difference steps +x +y +z -x -y -z."""
        return self.probe_directions.to(dtype) * (self.config.normal_epsilon * self.scene_radius)

    def _normals_from_probes(self, probes: torch.Tensor) -> torch.Tensor:
        """Unit normals (N, 3) from the densities (N, 6) at the probes +x +y +z -x -y -z."""
        eps = self.config.normal_epsilon * self.scene_radius
        plus, minus = probes.view(-1, 2, 3).unbind(1)
        # normalize(-grad) with grad = (sig+ - sig-) / (2 eps): the positive factor 1 / (2 eps) cancels
        return F.normalize(minus - plus, dim=-1, eps=1e-12 * 2 * eps)

    def finite_difference_normals(self, x: torch.Tensor) -> torch.Tensor:
        probes = (x[:, None, :] + self._probe_offsets(x.dtype)[1:]).reshape(-1, 3)
        return self._normals_from_probes(self.density(probes).view(-1, 6))


class _OverLearnedBackground(torch.autograd.Function):
    """rgb + (1 - opacity) * sigmoid(MLP(encoding)) for the background's one-hidden-layer MLP, as one autograd
    node: it runs every training step on every ray, and through autograd the MLP, the sigmoid and the blend
    take about twice the ATen ops of this hand-written backward (same formulas)."""

    @staticmethod
    def forward(ctx, rgb, opacity, encoding, w1, b1, w2, b2):
        hidden = torch.addmm(b1, encoding, w1.t()).relu_()
        colour = torch.addmm(b2, hidden, w2.t()).sigmoid_()
        clear = 1.0 - opacity
        ctx.save_for_backward(encoding, hidden, colour, clear, w2)
        return torch.addcmul(rgb, clear, colour)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        encoding, hidden, colour, clear, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_opacity = torch.mul(grad, colour).sum(-1, keepdim=True).neg_() if need[1] else None
        grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if any(need[3:]):
            grad_logit = torch.ops.aten.sigmoid_backward(grad * clear, colour)
            grad_w2, grad_b2 = grad_logit.t().mm(hidden), grad_logit.sum(0)
            grad_hidden = torch.ops.aten.threshold_backward(grad_logit.mm(w2), hidden, 0)
            grad_w1, grad_b1 = grad_hidden.t().mm(encoding), grad_hidden.sum(0)
        return grad if need[0] else None, grad_opacity, None, grad_w1, grad_b1, grad_w2, grad_b2


class BackgroundModel(nn.Module):
    """Colour seen where rays leave the scene: a small MLP on the ray direction's frequency encoding, or a
    fixed colour."""

    def __init__(self, kind: str = "mlp", color=(1.0, 1.0, 1.0), n_frequencies: int = 4, hidden_dim: int = 32):
        super().__init__()
        check(kind in ("mlp", "fixed"), f"background must be 'mlp' or 'fixed', got {kind!r}")
        self.kind = kind
        self.n_frequencies = n_frequencies
        self.register_buffer("color", torch.as_tensor(color, dtype=torch.float32).reshape(3))
        self.mlp = _mlp(3 + 6 * n_frequencies, hidden_dim, 1, 3) if kind == "mlp" else None

    def encode(self, directions: torch.Tensor) -> torch.Tensor:
        """(N, 3) directions -> (N, 3 + 6F): the direction, then sin(2^k pi d) and cos(2^k pi d), each ordered by
        component then frequency k (`ops.frequency_encode`, one pass)."""
        return ops.frequency_encode(directions, n_frequencies=self.n_frequencies)

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            return self.color.to(directions.dtype).expand(directions.shape[0], 3)
        return torch.sigmoid(mlp_forward(self.mlp, self.encode(directions)))

    def over(self, rgb: torch.Tensor, opacity: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """rgb (N, 3) with opacity (N, 1) composited over the background seen along directions (N, 3):
        rgb + (1 - opacity) * background."""
        if self.mlp is None or not torch.is_grad_enabled():
            return torch.addcmul(rgb, 1.0 - opacity, self(directions))
        first, second = self.mlp[0], self.mlp[2]
        return _OverLearnedBackground.apply(rgb, opacity, self.encode(directions), first.weight, first.bias,
                                            second.weight, second.bias)
