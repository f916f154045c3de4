"""Training stages: what the training loop optimises (see `base.Stage`). ``STAGES`` maps the names listed
in the configuration (``stages``, trained in that order) and stored in every checkpoint to the classes;
checkpoints written before stages were named hold a NeRF run."""
from __future__ import annotations

from typing import Dict, Type

from ..errors import FastDreamError
from .base import Stage, StepLoss, StepPlan
from .mesh import MeshStage
from .nerf import NeRFStage

STAGES: Dict[str, Type[Stage]] = {NeRFStage.name: NeRFStage, MeshStage.name: MeshStage}
DEFAULT_STAGE = NeRFStage.name


def stage_class(name: str) -> Type[Stage]:
    if name not in STAGES:
        raise FastDreamError(f"Unknown training stage {name!r}; this fastdream knows {', '.join(sorted(STAGES))}. "
                             "A checkpoint naming another stage was written by a newer fastdream: upgrade to read it.")
    return STAGES[name]


def build_stage(name: str, config, device) -> Stage:
    return stage_class(name)(config, device)


__all__ = ["Stage", "StepLoss", "StepPlan", "NeRFStage", "MeshStage", "STAGES", "DEFAULT_STAGE", "stage_class", "build_stage"]
