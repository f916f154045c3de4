"""The seam between the training loop and what it trains.

The loop (`fastdream.train.Trainer`) owns what every stage shares: steps, the random generators,
the optimizer built from the stage's parameter groups, the NaN guard, Ctrl-C, atomic checkpoints,
progress and previews. A stage owns its modules and everything specific to them:

* ``param_groups(optim)``: Adam parameter groups (each with ``lr`` and a ``name``);
* ``plan(step, progress)``: the host decisions of a step (shading mode, regulariser weights), taken before
  any device work, so that a step's device work can be captured once and replayed (`fastdream.step_capture`);
* ``loss(cameras, step, progress, guidance, generator, plan)``: the loss of one batch of sampled cameras;
* ``set_input_view(photo, camera)``: image-to-3D only: the input photo to reconstruct at its camera;
* ``after_step(step, generator)``: housekeeping after the optimizer step (e.g. the occupancy grid);
* ``state_dict()`` / ``load_state_dict()``: its modules' state, stored at the top level of a checkpoint
  next to ``"stage": name``;
* ``preview(path, output)`` and ``export(out_dir, output, say)``: what it writes.

A run trains the stages of ``config.stages`` one after the other (`fastdream.train.Trainer`). A stage
says how many steps it runs (``n_steps``), at which image size its cameras render (``image_size``), which
stage it can start from (``can_follow``) and takes over that stage's trained state in ``init_from``;
``guidance_options`` adjusts the guidance while it trains (e.g. a lower timestep range). ``loss`` and
``after_step`` get the step counted from the stage's own start.

A new stage is one module in this package with a ``Stage`` subclass, listed in ``STAGES``
(``fastdream/stages/__init__.py``).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


@dataclass
class StepLoss:
    """A stage's loss for one batch: the total (a scalar tensor), its named terms (scalar tensors, read back
    without their gradient with the loss in one host sync; ``term_vector``: more named terms as one (K,) tensor,
    read back the same way without a select per term), what the loop reports (e.g. the shading used) and device
    scalars for metrics.jsonl (read back every output.metrics_every steps, never per step)."""
    loss: torch.Tensor
    terms: Dict[str, torch.Tensor] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    term_vector: Tuple[Tuple[str, ...], Optional[torch.Tensor]] = ((), None)


@dataclass
class StepPlan:
    """What the host decides for one step before any device work.

    ``key`` names every host value the step's device work depends on, other than the continuous ``weights``:
    two steps with the same key run the same ops on the same shapes, so a graph captured on one replays the
    other (`fastdream.step_capture`). The ``weights`` (e.g. regularisers ramped over training) change every
    step; they reach the loss as one device tensor (``bind``), never as Python floats baked into the ops.
    ``capturable`` is False for steps that must run eagerly (e.g. a step that also updates the occupancy
    grid inside its loss)."""
    key: Tuple = ()
    weights: Dict[str, float] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)
    capturable: bool = False
    values: Optional[torch.Tensor] = None  # the weights on the device, in ``weights``' order (see bind)

    def weight_vector(self, device) -> torch.Tensor:
        return torch.tensor(list(self.weights.values()), dtype=torch.float32, device=device)

    def bind(self, values: torch.Tensor) -> "StepPlan":
        self.values = values
        return self

    def weight(self, name: str):
        """The weight ``name`` as a 0-d device tensor once bound, else the host float."""
        if self.values is None:
            return self.weights[name]
        return self.values[list(self.weights).index(name)]

    def weight_slice(self, names: Tuple[str, ...], device=None) -> torch.Tensor:
        """The weights ``names`` as one (K,) tensor: a view of the bound device weights when the names are
        consecutive in ``weights`` (no op per weight), else stacked; unbound, a tensor of the host floats."""
        if self.values is None:
            return torch.tensor([self.weights[n] for n in names], dtype=torch.float32, device=device)
        keys = list(self.weights)
        first = keys.index(names[0])
        if tuple(keys[first:first + len(names)]) == tuple(names):
            return self.values[first:first + len(names)]
        return torch.stack([self.weight(n) for n in names])


class Stage(abc.ABC):
    name: str = ""

    def __init__(self, config, device: torch.device):
        self.config = config
        self.device = device

    @classmethod
    def n_steps(cls, config) -> int:
        """How many steps this stage trains for."""
        return config.steps

    @classmethod
    def can_follow(cls, previous) -> bool:
        """Whether this stage can start from a trained `previous` stage (a name; None: first of the run)."""
        return previous is None

    def init_from(self, previous: "Stage") -> None:
        """Take over what this stage starts from out of the trained `previous` stage."""
        from ..errors import FastDreamError

        raise FastDreamError(f"The {self.name!r} stage cannot start from a {previous.name!r} stage.")

    def image_size(self):
        """(width, height) of the training renders."""
        return self.config.width, self.config.height

    def guidance_options(self) -> Dict[str, Any]:
        """GuidanceOptions fields to change while this stage trains (none by default)."""
        return {}

    @property
    @abc.abstractmethod
    def scene_radius(self) -> float:
        """Half the largest side of the scene box: cameras are sampled at multiples of it."""

    @abc.abstractmethod
    def param_groups(self, optim) -> List[Dict[str, Any]]:
        ...

    def plan(self, step: int, progress: float) -> StepPlan:
        """The host decisions of this step (see StepPlan). Default: none, and the step is never captured."""
        return StepPlan()

    @abc.abstractmethod
    def loss(self, cameras, step: int, progress: float, guidance, generator: torch.Generator,
             plan: Optional[StepPlan] = None) -> StepLoss:
        ...

    def set_input_view(self, photo, camera) -> None:
        """Image-to-3D: the input photo (an `image_input.InputImage`) and its fixed camera, to reconstruct."""
        from ..errors import FastDreamError

        raise FastDreamError(f"The {self.name!r} stage cannot be trained from an input image.")

    def after_step(self, step: int, generator: torch.Generator) -> None:
        """Called after every step (finite or skipped), before the step counter advances."""

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        ...

    @abc.abstractmethod
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        ...

    @abc.abstractmethod
    def preview(self, path: Path, output) -> Path:
        ...

    @abc.abstractmethod
    def export(self, out_dir: Path, output, say: Callable[..., None]) -> Dict[str, str]:
        ...

    def train(self, mode: bool = True) -> "Stage":
        return self
