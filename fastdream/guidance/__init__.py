"""Score Distillation Sampling guidance from frozen 2D diffusion models.

    from fastdream.guidance import load_guidance
    guidance = load_guidance("stabilityai/stable-diffusion-2-1-base", "cuda")   # or a local folder
    guidance.set_prompt("a DSLR photo of a hamburger")     # or set_condition(Condition(prompt=...))
    out = guidance(images, cameras, "albedo", progress)   # images (B,3,H,W) in [0,1], requires grad
    out.loss.backward()                                   # d loss / d images == SDS gradient

Model families (Stable Diffusion, DeepFloyd IF, the reference scene, Zero-1-to-3) register themselves in
`registry` when this package is imported; a new family is one new module here, imported below.
Importing this package does not import diffusers/transformers; only loading a model does.
"""
from . import registry
from .base import (ATTENTION_BACKENDS, LATENT_MODES, OOM_HELP, WEIGHTINGS, Condition, Guidance, GuidanceOptions,
                   SDSOutput, out_of_memory_error)
from .loading import DEFAULT_MODEL, build_guidance, load_guidance, resolve_model
from .prompts import VIEWS, view_index, view_name, view_prompt, view_prompts, view_weights
from .joint import JointGuidance
from .registry import GuidanceFamily, register

# the built-in families register themselves on import (in this order: `--guidance` lists them so)
from .stable_diffusion import StableDiffusionGuidance  # noqa: E402
from .deepfloyd import DeepFloydIFGuidance  # noqa: E402
from .reference import ReferenceSceneGuidance  # noqa: E402
from .zero123 import Zero123Guidance  # noqa: E402

__all__ = [
    "Guidance", "GuidanceOptions", "SDSOutput", "Condition", "StableDiffusionGuidance", "DeepFloydIFGuidance",
    "ReferenceSceneGuidance", "Zero123Guidance", "JointGuidance", "load_guidance", "build_guidance", "registry", "GuidanceFamily", "register",
    "resolve_model", "DEFAULT_MODEL", "VIEWS", "view_index", "view_name", "view_prompt", "view_prompts",
    "view_weights", "WEIGHTINGS", "ATTENTION_BACKENDS", "LATENT_MODES", "OOM_HELP", "out_of_memory_error",
]
