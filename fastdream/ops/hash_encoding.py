"""Multiresolution hash-grid encoding (Instant-NGP), bit-compatible with tiny-cuda-nn's 3D HashGrid.

Rules copied from tiny-cuda-nn (encodings/grid.h, common_device.h), linear interpolation:
- level l has scale s_l = 2^(l * log2(per_level_scale)) * base_resolution - 1 (float32 arithmetic)
  and resolution r_l = ceil(s_l) + 1 vertices per axis;
- the level stores min(next_multiple(r_l^3, 8), 2^log2_hashmap_size) feature vectors, levels are
  concatenated in order, each vector holds n_features_per_level contiguous values;
- a point x in [0,1]^3 maps to p = s_l * x + 0.5 (the half-cell offset), corner = floor(p) + {0,1}^3;
- a level whose r_l^3 exceeds its table size is hashed (XOR of coords times 1, 2654435761, 805459861,
  uint32 wrap-around), otherwise indexed densely (x + y*r + z*r^2); either way modulo the table size;
- output is level-major: features of level 0, then level 1, ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from ..errors import check

PRIMES = (1, 2654435761, 805459861)
_MAX_DENSE_RESOLUTION_3D = 0x659  # tcnn's overflow guard: r^3 must fit in uint32


def default_per_level_scale(n_levels: int = 16, base_resolution: int = 16, max_resolution: int = 2048) -> float:
    """Growth factor that takes the grid from base_resolution to max_resolution over n_levels."""
    if n_levels <= 1:
        return 1.0
    return float(math.exp(math.log(max_resolution / base_resolution) / (n_levels - 1)))


DEFAULT_PER_LEVEL_SCALE = default_per_level_scale()


@dataclass(frozen=True)
class HashGridLayout:
    """Where each level lives in the flat parameter vector, and how it is indexed."""

    scales: List[float]  # float32 values, as tcnn computes them
    resolutions: List[int]
    offsets: List[int]  # in feature vectors; len = n_levels + 1
    hashed: List[bool]
    n_features_per_level: int

    @property
    def n_params(self) -> int:
        return self.offsets[-1] * self.n_features_per_level


def _grid_scale(level: int, log2_per_level_scale: np.float32, base_resolution: int) -> np.float32:
    return np.float32(np.exp2(np.float32(level) * log2_per_level_scale) * np.float32(base_resolution) - np.float32(1.0))


def hash_grid_layout(
    n_levels: int = 16,
    n_features_per_level: int = 2,
    log2_hashmap_size: int = 19,
    base_resolution: int = 16,
    per_level_scale: Optional[float] = None,
) -> HashGridLayout:
    check(n_levels >= 1, f"n_levels must be >= 1, got {n_levels}")
    check(n_features_per_level in (1, 2, 4, 8), f"n_features_per_level must be 1, 2, 4 or 8 (as in tiny-cuda-nn), got {n_features_per_level}")
    check(1 <= log2_hashmap_size <= 30, f"log2_hashmap_size must be in [1, 30], got {log2_hashmap_size}")
    check(base_resolution >= 1, f"base_resolution must be >= 1, got {base_resolution}")
    if per_level_scale is None:
        per_level_scale = DEFAULT_PER_LEVEL_SCALE
    check(per_level_scale >= 1.0, f"per_level_scale must be >= 1, got {per_level_scale}")
    log2_pls = np.float32(np.log2(np.float32(per_level_scale)))
    max_params = (2**32 - 1) // 2
    scales, resolutions, offsets, hashed = [], [], [], []
    offset = 0
    for level in range(n_levels):
        scale = _grid_scale(level, log2_pls, base_resolution)
        resolution = int(math.ceil(float(scale))) + 1
        dense = max_params if float(resolution) ** 3 > max_params else resolution**3
        dense = (dense + 7) // 8 * 8
        size = min(dense, 1 << log2_hashmap_size)
        stride = resolution**3 if resolution <= _MAX_DENSE_RESOLUTION_3D else 0xFFFFFFFF
        scales.append(float(scale))
        resolutions.append(resolution)
        offsets.append(offset)
        hashed.append(size < stride)
        offset += size
    offsets.append(offset)
    return HashGridLayout(scales, resolutions, offsets, hashed, n_features_per_level)


def hash_grid_n_params(
    n_levels: int = 16,
    n_features_per_level: int = 2,
    log2_hashmap_size: int = 19,
    base_resolution: int = 16,
    per_level_scale: Optional[float] = None,
) -> int:
    """Number of values in the flat parameter vector (tiny-cuda-nn's n_params for the same config)."""
    return hash_grid_layout(n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale).n_params


def check_hash_encode_inputs(x: torch.Tensor, params: torch.Tensor, layout: HashGridLayout) -> None:
    check(isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == 3, f"hash_encode: x must be a (N, 3) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    check(x.is_floating_point(), f"hash_encode: x must be floating point, got {x.dtype}")
    check(isinstance(params, torch.Tensor) and params.dim() == 1, f"hash_encode: params must be a flat (P,) tensor, got shape {tuple(getattr(params, 'shape', ()))}")
    check(params.is_floating_point(), f"hash_encode: params must be floating point, got {params.dtype}")
    check(params.numel() == layout.n_params, f"hash_encode: params has {params.numel()} values but this grid config needs {layout.n_params} (see hash_grid_n_params)")
    check(x.device == params.device, f"hash_encode: x is on {x.device} but params on {params.device}")
    if x.numel() > 0:
        lo, hi = torch.aminmax(x.detach())
        check(bool(lo >= 0) and bool(hi <= 1), f"hash_encode: x must lie in [0, 1] (normalise positions by the scene box first); got values in [{float(lo):.4g}, {float(hi):.4g}]")


def _level_indices(corner: torch.Tensor, resolution: int, size: int, hashed: bool) -> torch.Tensor:
    """corner: (N, 3) int64 grid coordinates -> (N,) int64 table index, tcnn's grid_index."""
    if hashed:
        h = corner[:, 0] * PRIMES[0]
        h = torch.bitwise_xor(h, (corner[:, 1] * PRIMES[1]) & 0xFFFFFFFF)
        h = torch.bitwise_xor(h, (corner[:, 2] * PRIMES[2]) & 0xFFFFFFFF)
        index = h & 0xFFFFFFFF
    else:
        index = (corner[:, 0] + corner[:, 1] * resolution + corner[:, 2] * resolution * resolution) & 0xFFFFFFFF
    return index % size


def hash_encode_reference(x: torch.Tensor, params: torch.Tensor, layout: HashGridLayout) -> torch.Tensor:
    """Plain-PyTorch hash encoding; differentiable w.r.t. x and params to any order."""
    compute_dtype = torch.float64 if (x.dtype == torch.float64 or params.dtype == torch.float64) else torch.float32
    xc = x.to(compute_dtype)
    F = layout.n_features_per_level
    table_all = params.to(compute_dtype).view(-1, F)
    outputs = []
    corners = torch.tensor([[(c >> d) & 1 for d in range(3)] for c in range(8)], device=x.device, dtype=torch.int64)  # (8,3)
    for level, (scale, res, hashed) in enumerate(zip(layout.scales, layout.resolutions, layout.hashed)):
        start, end = layout.offsets[level], layout.offsets[level + 1]
        table = table_all[start:end]
        pos = xc * scale + 0.5
        pos_floor = torch.floor(pos.detach())
        frac = pos - pos_floor  # gradient flows through pos only
        base = pos_floor.to(torch.int64)
        feats = xc.new_zeros((x.shape[0], F))
        for c in range(8):
            offs = corners[c]
            idx = _level_indices(base + offs, res, end - start, hashed)
            w = torch.where(offs.bool(), frac, 1 - frac).prod(dim=1, keepdim=True)
            feats = feats + w * table[idx]
        outputs.append(feats)
    out = torch.cat(outputs, dim=1) if outputs else xc.new_zeros((x.shape[0], 0))
    return out.to(params.dtype if params.dtype != torch.float16 else torch.float32)
