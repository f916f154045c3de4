"""DreamFusion shading: c = albedo * (light_intensity * max(0, n . (l - x) / |l - x|) + ambient).

Modes: "lambertian" (full shading), "textureless" (albedo replaced by white), "albedo" (no shading).
"""
from __future__ import annotations

import torch

from ..errors import check

SHADING_MODES = ("albedo", "lambertian", "textureless")
SHADING_CODES = {name: code for code, name in enumerate(SHADING_MODES)}


def shading_code(mode: str) -> int:
    check(mode in SHADING_CODES, f"unknown shading mode {mode!r}; choose one of {', '.join(SHADING_MODES)}")
    return SHADING_CODES[mode]


def shade(albedo: torch.Tensor, normals: torch.Tensor, positions: torch.Tensor, light_positions: torch.Tensor,
          light_intensity: torch.Tensor, ambient: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-sample colour. albedo/normals/positions/light_positions (N, 3); light_intensity/ambient (N,) or scalars."""
    code = shading_code(mode)
    if code == SHADING_CODES["albedo"]:
        return albedo
    to_light = light_positions - positions
    to_light = to_light / torch.linalg.vector_norm(to_light, dim=-1, keepdim=True).clamp_min(1e-12)
    lambert = (normals * to_light).sum(-1).clamp_min(0.0)
    light = torch.as_tensor(light_intensity, dtype=albedo.dtype, device=albedo.device)
    amb = torch.as_tensor(ambient, dtype=albedo.dtype, device=albedo.device)
    intensity = (light * lambert + amb)[:, None]
    if code == SHADING_CODES["textureless"]:
        return intensity.expand(-1, 3)
    return albedo * intensity
