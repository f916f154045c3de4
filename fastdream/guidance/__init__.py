"""Score Distillation Sampling guidance from frozen 2D diffusion models.

    from fastdream.guidance import load_guidance
    guidance = load_guidance("stabilityai/stable-diffusion-2-1-base", "cuda")   # or a local folder
    guidance.set_prompt("a DSLR photo of a hamburger")
    out = guidance(images, cameras, "albedo", progress)   # images (B,3,H,W) in [0,1], requires grad
    out.loss.backward()                                   # d loss / d images == SDS gradient

Importing this package does not import diffusers/transformers; only loading a model does.
"""
from .base import (ATTENTION_BACKENDS, LATENT_MODES, OOM_HELP, WEIGHTINGS, Guidance, GuidanceOptions, SDSOutput,
                   out_of_memory_error)
from .loading import DEFAULT_MODEL, load_guidance, resolve_model
from .prompts import VIEWS, view_index, view_name, view_prompt, view_prompts, view_weights


def __getattr__(name):  # lazy: these modules are cheap, but keep the import graph minimal
    if name == "StableDiffusionGuidance":
        from .stable_diffusion import StableDiffusionGuidance

        return StableDiffusionGuidance
    if name == "DeepFloydIFGuidance":
        from .deepfloyd import DeepFloydIFGuidance

        return DeepFloydIFGuidance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Guidance", "GuidanceOptions", "SDSOutput", "StableDiffusionGuidance", "DeepFloydIFGuidance", "load_guidance",
    "resolve_model", "DEFAULT_MODEL", "VIEWS", "view_index", "view_name", "view_prompt", "view_prompts",
    "view_weights", "WEIGHTINGS", "ATTENTION_BACKENDS", "LATENT_MODES", "OOM_HELP", "out_of_memory_error",
]
