"""NeRF's frequency (positional) encoding: a point x (D components) -> [x, sin(2^k pi x_c), cos(2^k pi x_c)] for
k < F, the sines and the cosines each ordered by component c, then by k. The background model encodes ray
directions with it. The PyTorch twin of the native op `frequency_encode`."""
from __future__ import annotations

import math

import torch

from ..errors import check


def check_frequency_encode_inputs(x: torch.Tensor, n_frequencies: int) -> None:
    check(x.dim() == 2 and x.is_floating_point(), f"frequency_encode: x must be a floating (N, D) tensor, got "
          f"{tuple(x.shape)} {x.dtype}")
    check(0 <= n_frequencies <= 64, f"frequency_encode: n_frequencies must be in [0, 64], got {n_frequencies}")


def frequency_encode_reference(x: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """x (N, D) -> (N, D * (1 + 2 * n_frequencies)), differentiable."""
    check_frequency_encode_inputs(x, n_frequencies)
    angles = x[..., None] * (2.0 ** torch.arange(n_frequencies, dtype=x.dtype, device=x.device) * math.pi)  # (N, D, F)
    return torch.cat([x, torch.sin(angles).flatten(1), torch.cos(angles).flatten(1)], dim=-1)
