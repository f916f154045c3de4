"""Guidance model families: each registers itself here, and the CLI's `--guidance` choices, the
configuration's `guidance.kind`, default models and the loader's model detection all read this table.

A family is one module in this package that ends with ``register(GuidanceFamily(...))`` and is imported
by ``fastdream/guidance/__init__.py``. This module imports none of them (no cycle): it only holds the
table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import FastDreamError

#: what a family's guidance can be conditioned on (`Condition` fields it reads)
CONDITIONINGS = ("text", "image", "pose")


@dataclass(frozen=True)
class GuidanceFamily:
    """name: the `--guidance` / `guidance.kind` value. create(source, device, dtype, options, **context) builds
    the guidance: source is the resolved model (a local folder or hub id; None when `needs_model` is False),
    dtype a torch dtype or None, options a GuidanceOptions, context the run's scene settings (render_config,
    grid_resolution, background_color, reference_scene, reference_resolution) for families that need them.
    recognise(pipeline_class, unet_config) says whether a diffusers folder (model_index.json `_class_name`,
    "" when absent, and unet/config.json or None) holds this family; it may raise FastDreamError for a near
    miss (e.g. an upscaler of the family). configure_run(config), when given, adjusts a new run's
    configuration to the family (the reference scene: the scene's box and its fixed background)."""
    name: str
    description: str
    create: Callable[..., Any]
    default_model: str = ""
    needs_model: bool = True
    recognise: Optional[Callable[[str, Optional[dict]], bool]] = None
    conditioning: Tuple[str, ...] = ("text",)
    option_defaults: Dict[str, Any] = field(default_factory=dict)
    configure_run: Optional[Callable[[Any], None]] = None

    def __post_init__(self):
        unknown = set(self.conditioning) - set(CONDITIONINGS)
        if unknown:
            raise ValueError(f"guidance family {self.name!r}: unknown conditioning {sorted(unknown)}")


_FAMILIES: Dict[str, GuidanceFamily] = {}


def register(family: GuidanceFamily) -> GuidanceFamily:
    """Add (or replace) a family; returns it."""
    _FAMILIES[family.name] = family
    return family


def names() -> Tuple[str, ...]:
    return tuple(_FAMILIES)


def families() -> List[GuidanceFamily]:
    return list(_FAMILIES.values())


def get(name: str) -> GuidanceFamily:
    if name not in _FAMILIES:
        raise FastDreamError(f"Unknown guidance {name!r}; choose one of {', '.join(_FAMILIES)}.")
    return _FAMILIES[name]


def default_model(name: str) -> str:
    return get(name).default_model


def detect(pipeline_class: str, unet_config: Optional[dict], source: str) -> GuidanceFamily:
    """The family whose recogniser accepts a diffusers folder, or a FastDreamError naming the supported ones."""
    for family in _FAMILIES.values():
        if family.recognise is not None and family.recognise(pipeline_class, unet_config):
            return family
    supported = "; ".join(f"{f.description} ('{f.default_model}')" for f in _FAMILIES.values() if f.recognise)
    raise FastDreamError(f"'{source}' is a {pipeline_class or 'unknown'} pipeline; fastdream's guidance supports: "
                         f"{supported}.")
