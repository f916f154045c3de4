"""Several guidances scoring the same renders, their SDS losses added with weights: Magic123's joint prior,
where a novel-view model (Zero-1-to-3) conditioned on the input photo and a text-to-image model (Stable
Diffusion) conditioned on the prompt guide one image-to-3D run together.

Each member keeps its own model, options (guidance scale, timestep range) and random generator, and draws its
own t and noise: the total SDS gradient is exactly sum_i w_i * (member i's SDS gradient), as if each member had
been called alone on the renders. The first member is the primary one: its t and gradient norm are what the run
logs as the step's `t` and `sds_grad_norm`; every member's own output is in `SDSOutput.parts`.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import FastDreamError
from .base import Condition, SDSOutput


class JointGuidance:
    """Weighted sum of SDS guidances. members: (name, guidance, weight) in order, the primary one first."""

    def __init__(self, members: Sequence[Tuple[str, Any, float]]):
        if not members:
            raise FastDreamError("A joint guidance needs at least one member.")
        names = [name for name, _, _ in members]
        if len(set(names)) != len(names):
            raise FastDreamError(f"The members of a joint guidance need distinct names, got {names}.")
        self.members = [(str(name), guidance, float(weight)) for name, guidance, weight in members]
        self.primary = self.members[0][1]
        self.conditioning = tuple(dict.fromkeys(c for _, g, _ in self.members for c in g.conditioning))

    @property
    def generator(self) -> Optional[torch.Generator]:
        return getattr(self.primary, "generator", None)

    @property
    def generators(self) -> Dict[str, Optional[torch.Generator]]:
        """Every member's generator by name (checkpoints keep them all for an exact resume)."""
        return {name: getattr(g, "generator", None) for name, g, _ in self.members}

    def set_condition(self, condition: Condition) -> None:
        """Give each member the part of the condition it reads: the prompt to text models, the photo and its
        pose to image-conditioned ones."""
        for _, g, _ in self.members:
            wants_image = "image" in g.conditioning
            g.set_condition(Condition(prompt=condition.prompt, negative_prompt=condition.negative_prompt,
                                      image=condition.image if wants_image else None,
                                      pose=condition.pose if wants_image else None))

    def __call__(self, images: torch.Tensor, cameras: Any, shading: str = "albedo", progress: float = 0.0, *,
                 t: Optional[Mapping[str, torch.Tensor]] = None,
                 noise: Optional[Mapping[str, torch.Tensor]] = None, opacity: Optional[torch.Tensor] = None) -> SDSOutput:
        """SDS of every member on ``images`` (with their opacity, for members that read it), summed with the
        weights. ``t``/``noise`` (tests) map member names to that member's draws."""
        t, noise = t or {}, noise or {}
        parts = {name: g(images, cameras, shading, progress, t=t.get(name), noise=noise.get(name), opacity=opacity)
                 for name, g, _ in self.members}
        loss = sum(w * parts[name].loss for name, _, w in self.members)
        first = parts[self.members[0][0]]
        n_nonfinite = sum(torch.as_tensor(p.n_nonfinite) for p in parts.values())
        return SDSOutput(loss=loss, t=first.t, grad_norm=first.grad_norm, n_nonfinite=n_nonfinite, parts=parts)

    def step_key(self, progress: float) -> Tuple:
        return tuple(g.step_key(progress) for _, g, _ in self.members)

    def count_call(self) -> None:
        for _, g, _ in self.members:
            g.count_call()

    def report_nonfinite(self) -> int:
        return sum(g.report_nonfinite() for _, g, _ in self.members)

    def describe(self) -> dict:
        return {"class": type(self).__name__,
                "members": [{"name": name, "weight": w, **g.describe()} for name, g, w in self.members]}
