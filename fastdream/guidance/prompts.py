"""View-dependent prompts (DreamFusion section 3.2).

Each sampled camera gets its prompt suffixed with ", front view", ", side view", ", back view" or
", overhead view" depending on where it looks from. Angle conventions follow ``fastdream.cameras``:
azimuth in degrees, 0 = front of the object, increasing around the up axis (any value is wrapped);
elevation in degrees, 90 = looking straight down.

Three rules (``GuidanceOptions.view_selection``):

"paper" (default), DreamFusion's: the front/side/back embeddings are blended by azimuth, linearly in
|azimuth| (front at 0, side at 90, back at 180 degrees), and the "overhead" embedding replaces the
blend outright above overhead_deg (60) of elevation.

"hard" (threestudio's and stable-dreamfusion's), one view per camera, in priority order (later rules win):
  side      otherwise
  front     |azimuth| <= front_deg               (azimuth wrapped to (-180, 180])
  back      |azimuth| >= 180 - back_deg
  overhead  elevation > overhead_deg
Defaults front_deg = back_deg = 45 and overhead_deg = 60 are the values threestudio uses for
DreamFusion (stable-dreamfusion uses a narrower +-30 degree front sector and the same overhead cut).


"interpolate": the paper's azimuth blend, then towards "overhead" linearly in elevation from
overhead_deg (weight 0) to 90 degrees (weight 1) instead of the hard switch.

Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm"; threestudio's
``prompt_processors/base.py`` ``get_text_embeddings_perp_neg``) adds two *negative* view prompts per
camera, weighted by how far the camera is from the views they name (``perp_neg_weights``): between the
front and the side (|azimuth| < 90) the negatives are "front" and "side"; between the side and the back
they are "side" and "front". With r the position between the two views (r = 1 - |azimuth| / 90 from the
side to the front; r = 2 - |azimuth| / 90 from the back to the side) and f(a, b, c; r) = a exp(-b r) + c:

  front-side   w_front = -f_fs(r),   w_side  = -f_sf(1 - r)
  side-back    w_side  = -f_sb(r),   w_front = -f_fsb(r)
  overhead     both 0 (elevation > overhead_deg)

threestudio's defaults f_fs = f_sf = (4, 0.5, -2.426), f_sb = (1, 0.5, -0.606), f_fsb = (1, 0.5, 0.967)
make a view's own negative vanish where the camera sees that view (f_fs(1) = 0: no "front" negative
from the front) and push hardest against the front from the back (w_front = -1.967 at 180 degrees).
All functions are pure tensor ops (no host sync), so they can run every step on the GPU.
"""
from __future__ import annotations

import functools

from typing import List, Tuple, Union

import torch
import torch.nn.functional as F

VIEWS = ("front", "side", "back", "overhead")
FRONT, SIDE, BACK, OVERHEAD = range(4)

Angle = Union[float, torch.Tensor]


def view_prompt(prompt: str, view: str) -> str:
    """The prompt for one view: ``"a chair" , "side" -> "a chair, side view"``."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    return f"{prompt}, {view} view"


def view_prompts(prompt: str) -> List[str]:
    """The four view prompts in ``VIEWS`` order."""
    return [view_prompt(prompt, v) for v in VIEWS]


def _as_tensor(x: Angle, like: torch.Tensor = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float()
    device = like.device if like is not None else None
    return torch.as_tensor(x, dtype=torch.float32, device=device)


def wrap_azimuth(azimuth_deg: torch.Tensor) -> torch.Tensor:
    """Wrap azimuths to (-180, 180]."""
    a = torch.remainder(azimuth_deg, 360.0)
    return torch.where(a > 180.0, a - 360.0, a)


def view_index(elevation_deg: Angle, azimuth_deg: Angle, front_deg: float = 45.0, back_deg: float = 45.0,
               overhead_deg: float = 60.0) -> torch.Tensor:
    """Index into ``VIEWS`` (long tensor, same shape as the angles) for each camera."""
    azimuth_deg = _as_tensor(azimuth_deg)
    elevation_deg = _as_tensor(elevation_deg, azimuth_deg)
    a = wrap_azimuth(azimuth_deg).abs()
    idx = torch.full_like(a, SIDE, dtype=torch.long)
    idx = torch.where(a <= front_deg, torch.full_like(idx, FRONT), idx)
    idx = torch.where(a >= 180.0 - back_deg, torch.full_like(idx, BACK), idx)
    idx = torch.where(elevation_deg > overhead_deg, torch.full_like(idx, OVERHEAD), idx)
    return idx


def view_name(elevation_deg: float, azimuth_deg: float, **thresholds) -> str:
    """Convenience for one camera: the view name ("front", "side", ...)."""
    return VIEWS[int(view_index(float(elevation_deg), float(azimuth_deg), **thresholds))]


def view_weights(elevation_deg: Angle, azimuth_deg: Angle, overhead_deg: float = 60.0,
                 overhead_ramp: bool = False) -> torch.Tensor:
    """Blend weights (..., 4) over ``VIEWS``; rows sum to 1. Overhead takes over above overhead_deg at
    once (the paper's rule) or, with ``overhead_ramp``, linearly from overhead_deg to 90 degrees."""
    azimuth_deg = _as_tensor(azimuth_deg)
    elevation_deg = _as_tensor(elevation_deg, azimuth_deg)
    # r = |azimuth wrapped to (-180, 180]| / 90: 0 front, 1 side, 2 back; front/side/back are the hat
    # functions max(0, 1 - |r - k|), k = 0, 1, 2 (a few ops: this runs every training step)
    r = (torch.remainder(azimuth_deg, 360.0) - 180.0).abs().mul_(-1.0 / 90.0).add_(2.0)
    hats = (1.0 - (r[..., None] - _view_centres(r.device)).abs()).clamp_min_(0.0)
    if overhead_ramp:
        o = ((elevation_deg - overhead_deg) / max(90.0 - overhead_deg, 1e-6)).clamp(0.0, 1.0)
    else:
        o = (elevation_deg > overhead_deg).to(hats.dtype)
    return torch.cat([hats * (1.0 - o)[..., None], o[..., None]], dim=-1)


def view_blend_table(embeddings: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For ``blend_views``: the view embeddings (4, L, D) in ``VIEWS`` order as (a (1, L*D, 1, 5) float32 table of
    the back, side, front, side and back embeddings at azimuths -180, -90, 0, 90 and 180 degrees, the overhead
    embedding (L, D) float32)."""
    e = embeddings.float()
    columns = [e[BACK], e[SIDE], e[FRONT], e[SIDE], e[BACK]]
    return torch.stack(columns, dim=-1).reshape(1, -1, 1, len(columns)), e[OVERHEAD]


def blend_views(table: Tuple[torch.Tensor, torch.Tensor], elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor,
                overhead_deg: float = 60.0, overhead_ramp: bool = False) -> torch.Tensor:
    """``view_weights(elevation_deg, azimuth_deg) @ embeddings`` (B, L, D) float32 for cameras (B,), from
    ``view_blend_table(embeddings)`` in a handful of ops (this runs every training step): the hat functions of
    front/side/back over the azimuth are a linear interpolation of the table's columns (one grid_sample; its
    reflection padding wraps any azimuth, the weights being even and 360-periodic), the overhead view takes over
    as in view_weights."""
    columns, overhead = table
    b = azimuth_deg.shape[0]
    x = torch.div(azimuth_deg, 180.0).view(b, 1, 1, 1).expand(b, 1, 1, 2)  # the table has one row: y is ignored
    blend = F.grid_sample(columns.expand(b, -1, -1, -1), x, mode="bilinear", padding_mode="reflection",
                          align_corners=True).view(b, *overhead.shape)
    if overhead_ramp:
        o = ((elevation_deg - overhead_deg) / max(90.0 - overhead_deg, 1e-6)).clamp(0.0, 1.0)
        return torch.lerp(blend, overhead, o.view(b, 1, 1))
    return torch.where((elevation_deg > overhead_deg).view(b, 1, 1), overhead, blend)


@functools.lru_cache(maxsize=8)
def _view_centres(device: torch.device) -> torch.Tensor:
    """(0, 1, 2): where the front, side and back weights peak on view_weights' azimuth scale."""
    return torch.arange(3, dtype=torch.float32, device=device)


def _decay(abc, r: torch.Tensor) -> torch.Tensor:
    a, b, c = (float(v) for v in abc)
    return a * torch.exp(-b * r) + c


def perp_neg_weights(elevation_deg: Angle, azimuth_deg: Angle, f_sb, f_fsb, f_fs, f_sf,
                     overhead_deg: float = 60.0):
    """Perp-Neg's two negative views per camera: (views (..., 2) long indices into ``VIEWS``, weights (..., 2)
    float32, all <= 0 for the default curves). See the module docstring for the rule."""
    azimuth_deg = _as_tensor(azimuth_deg)
    elevation_deg = _as_tensor(elevation_deg, azimuth_deg)
    a = wrap_azimuth(azimuth_deg).abs()
    front_side = a < 90.0
    r = torch.where(front_side, 1.0 - a / 90.0, 2.0 - a / 90.0)
    w_first = torch.where(front_side, -_decay(f_fs, r), -_decay(f_sb, r))
    w_second = torch.where(front_side, -_decay(f_sf, 1.0 - r), -_decay(f_fsb, r))
    overhead = elevation_deg > overhead_deg
    weights = torch.stack([w_first, w_second], dim=-1) * (~overhead).unsqueeze(-1).to(torch.float32)
    front, side = torch.full_like(a, FRONT, dtype=torch.long), torch.full_like(a, SIDE, dtype=torch.long)
    views = torch.stack([torch.where(front_side, front, side), torch.where(front_side, side, front)], dim=-1)
    return views, weights
