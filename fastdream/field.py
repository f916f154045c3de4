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
from .fused_mlp import backward_layers, forward_layers, layer_tensors, mlp_forward
from .ops.field_head import PROBES, TruncExp, normals_from_probes, with_probes  # noqa: F401 (TruncExp: re-export)


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
        cfg = self.config
        self._probe_step = cfg.normal_epsilon * self._scene_radius
        # the output head's constants (ops.field_head), host values
        self._head = dict(step=self._probe_step, density_bias=cfg.density_bias, blob_density=cfg.blob_density,
                          blob_radius=cfg.blob_radius * self._scene_radius, blob_shape=cfg.blob_shape,
                          activation=cfg.density_activation)

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

    def _raw(self, x: torch.Tensor, k: int = 1, detach_grid: bool = False, fused_mlp: bool = True) -> torch.Tensor:
        """The MLP's raw output (N * k, 4) at world points x (N, 3) and, with k = 7, their probes."""
        unit = ops.probe_points(x, unit_scale=self.unit_scale, unit_offset=self.unit_offset, step=self._probe_step, k=k)
        params = self.encoding_params.detach() if detach_grid else self.encoding_params
        features = ops.hash_encode(unit, params, check_range=False, **self.encoding_kwargs)
        if self.active_levels < self.config.n_levels:  # later (finer) levels masked out: no signal, no gradient
            keep = self.active_levels * self.config.n_features_per_level
            features = torch.cat([features[:, :keep], torch.zeros_like(features[:, keep:])], dim=1)
        features = features.to(self.mlp[0].weight.dtype)
        return mlp_forward(self.mlp, features) if fused_mlp else self.mlp(features)

    def _apply_head(self, raw: torch.Tensor, x: torch.Tensor, k: int = 1, with_albedo: bool = True):
        return ops.field_head(raw, x, centre=self.box_centre, k=k, with_albedo=with_albedo, **self._head)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Volumetric density sigma >= 0 at world points x (N, 3) -> (N,)."""
        return self._apply_head(self._raw(x), x, with_albedo=False)[0]

    def query(self, x: torch.Tensor, need_normals: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Density (N,), albedo (N,3) in [0,1] and, if asked, unit normals (N,3) pointing out of the surface."""
        if need_normals and self.config.normals == "analytic":
            graph = torch.is_grad_enabled() and self.training
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                # Without a graph only d(sigma)/dx is wanted: a detached hash grid keeps the backward from
                # computing (zeroing, scattering) a grid-sized parameter gradient autograd.grad would drop.
                raw = self._raw(xg, detach_grid=not graph, fused_mlp=not graph)  # a graph: differentiated twice
                sigma = self._apply_head(raw, xg, with_albedo=False)[0]
                grad = torch.autograd.grad(sigma.sum(), xg, create_graph=graph)[0]
            normals = F.normalize(-grad, dim=-1, eps=1e-12)
            if not graph:
                sigma, raw = sigma.detach(), raw.detach()
            return sigma, torch.sigmoid(raw[:, 1:]), normals
        # Finite differences: x and its six probes go through one encoding, MLP and head (ops.field_head: one op
        # forward, one backward).
        k = PROBES if need_normals else 1
        return self._apply_head(self._raw(x, k), x, k)

    def finite_difference_normals(self, x: torch.Tensor) -> torch.Tensor:
        """The normals of query(x, need_normals=True) from six separate density() calls (a plain reference)."""
        probes = with_probes(x, self._probe_step, PROBES).view(-1, PROBES, 3)[:, 1:].reshape(-1, 3)
        return normals_from_probes(self.density(probes).view(-1, PROBES - 1), self._probe_step)


class _OverLearnedBackground(torch.autograd.Function):
    """rgb + (1 - opacity) * sigmoid(MLP(encoding)) as one autograd node: it runs every training step on every
    ray. The MLP's passes are fused_mlp's (`forward_layers`, `backward_layers`); this node adds the sigmoid and the
    blend, so autograd keeps no graph of its own for them."""

    @staticmethod
    def forward(ctx, rgb, opacity, encoding, weights_t, *params):
        n = len(weights_t)
        weights, biases = params[:n], params[n:]
        inputs = []
        colour = forward_layers(encoding, weights_t, biases, inputs).sigmoid_()
        clear = 1.0 - opacity
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(colour, clear, *inputs, *weights)
        return torch.addcmul(rgb, clear, colour)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        colour, clear, *saved = ctx.saved_tensors
        n = len(saved) // 2
        need = ctx.needs_input_grad
        grad_opacity = torch.mul(grad, colour).sum(-1, keepdim=True).neg_() if need[1] else None
        grad_encoding, grad_w, grad_b = None, [None] * n, [None] * n
        if need[2] or any(need[4:]):
            grad_logit = torch.ops.aten.sigmoid_backward(grad * clear, colour)
            grad_encoding, grad_w, grad_b = backward_layers(grad_logit, saved[:n], saved[n:], ctx.has_bias, need[2],
                                                            need[4:])
        return grad if need[0] else None, grad_opacity, grad_encoding, None, *grad_w, *grad_b


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
        weights_t, weights, biases = layer_tensors(self.mlp)
        return _OverLearnedBackground.apply(rgb, opacity, self.encode(directions), weights_t, *weights, *biases)
