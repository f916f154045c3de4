"""SDS guidance from Zero-1-to-3 (zero123-xl, Stable-Zero123): a novel-view diffusion model conditioned on
one input image and the camera's pose relative to it.

The model is a Stable Diffusion UNet with 8 input channels: the noisy latents of the novel view
concatenated with the input image's VAE latents (the posterior mean, *unscaled*, as the original
latent-diffusion code and threestudio's / stable-dreamfusion's zero123 guidance feed them). Its cross
attention reads one token: the CLIP image embedding of the input image concatenated with the relative
pose [delta elevation (radians), sin delta azimuth, cos delta azimuth, delta distance] and mapped back
to the embedding width by a linear layer (`CLIPCameraProjection`). Delta elevation is
input-view elevation minus novel-view elevation (zero123's "polar" offset), delta azimuth novel minus
input. Classifier-free guidance follows the model's training dropout: the unconditional branch zeroes
both the projected embedding and the image latents; the default scale is 3 (threestudio's zero123).

Per step: renders (B,3,H,W) in [0,1] -> model resolution (256 for zero123) -> VAE encoder (differentiable,
posterior mean times the scaling factor) -> latents -> SDS (see ``base``) with the pose of each camera.

Loading reads the components of a diffusers-layout folder or hub id one by one (diffusers has no core
Zero-1-to-3 pipeline): unet/, vae/, image_encoder/ (CLIPVisionModelWithProjection), feature_extractor/
(CLIPImageProcessor), scheduler/ and clip_camera_projection/ (this module's class; the community layout's
cc_projection/ linear layer is read too), the layout of 'bennyguo/zero123-xl-diffusers'.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from ..errors import FastDreamError
from .base import Guidance, GuidanceOptions, resize_images
from .loading import load_component, prepare_module, resolve_device, resolve_dtype
from .registry import GuidanceFamily, register

log = logging.getLogger("fastdream")

DEFAULT_ZERO123_MODEL = "bennyguo/zero123-xl-diffusers"
DEFAULT_GUIDANCE_SCALE = 3.0


@functools.lru_cache(maxsize=None)
def camera_projection_class():
    """The `CLIPCameraProjection` class (a diffusers ModelMixin/ConfigMixin linear layer), defined on first use so
    that importing fastdream does not import diffusers."""
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin

    class _CLIPCameraProjection(ModelMixin, ConfigMixin):
        """Linear map from [CLIP image embedding, 4 pose numbers] to the UNet's cross-attention width;
        saved and loaded as the clip_camera_projection/ folder of zero123 diffusers models."""

        @register_to_config
        def __init__(self, embedding_dim: int = 768, additional_embeddings: int = 4):
            super().__init__()
            self.embedding_dim = embedding_dim
            self.additional_embeddings = additional_embeddings
            self.input_dim = embedding_dim + additional_embeddings
            self.output_dim = embedding_dim
            self.proj = nn.Linear(self.input_dim, self.output_dim)

        def forward(self, embedding: torch.Tensor) -> torch.Tensor:
            return self.proj(embedding)

    _CLIPCameraProjection.__name__ = _CLIPCameraProjection.__qualname__ = "CLIPCameraProjection"
    return _CLIPCameraProjection


def relative_pose(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor,
                  cond_elevation_deg: torch.Tensor, cond_azimuth_deg: torch.Tensor,
                  cond_distance: torch.Tensor) -> torch.Tensor:
    """(B, 4): [d_elevation (rad), sin d_azimuth, cos d_azimuth, d_distance] of the novel views relative to the
    input view (threestudio's convention: input minus novel elevation, novel minus input azimuth)."""
    d_azim = torch.deg2rad(azimuth_deg - cond_azimuth_deg)
    return torch.stack([torch.deg2rad(cond_elevation_deg - elevation_deg), torch.sin(d_azim), torch.cos(d_azim),
                        distance - cond_distance], dim=-1)


class Zero123Guidance(Guidance):
    """Zero-1-to-3 SDS guidance. Build with ``load_guidance`` / ``from_pretrained`` or from the modules."""

    conditioning = ("image", "pose")

    def __init__(self, unet, vae, image_encoder, feature_extractor, camera_projection, scheduler,
                 options: Optional[GuidanceOptions] = None, device: Any = None, dtype: Any = None):
        options = (options or GuidanceOptions(guidance_scale=DEFAULT_GUIDANCE_SCALE, view_dependent=False)).validate()
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        super().__init__(options=options, device=device, dtype=dtype,
                         alphas_cumprod=torch.as_tensor(scheduler.alphas_cumprod))
        if int(unet.config.in_channels) != 2 * int(unet.config.out_channels):
            raise FastDreamError(
                f"This UNet takes {unet.config.in_channels} input channels for {unet.config.out_channels} output "
                "channels; a Zero-1-to-3 UNet takes the noisy latents and the input image's latents (twice the output).")
        self.unet = prepare_module(unet, device, dtype, options.channels_last)
        self.vae = prepare_module(vae, device, dtype, options.channels_last)
        self.image_encoder = prepare_module(image_encoder, device, dtype)
        self.camera_projection = prepare_module(camera_projection, device, dtype)
        self.feature_extractor = feature_extractor
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_resolution = int(unet.config.sample_size)
        self.resolution = self.latent_resolution * self.vae_scale_factor
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
        self.image_embedding: Optional[torch.Tensor] = None  # (1, 1, D) CLIP embedding of the input image
        self.image_latents: Optional[torch.Tensor] = None    # (1, C, h, w) its unscaled VAE latents
        self.input_pose: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # elevation, azimuth, distance

    @classmethod
    def from_pretrained(cls, source: str, device: Any = None, dtype: Any = None,
                        options: Optional[GuidanceOptions] = None) -> "Zero123Guidance":
        """Load the UNet, VAE, CLIP image encoder and processor, camera projection and scheduler of a zero123
        diffusers folder / hub id."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from .loading import transformers_dtype_kwarg

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        unet = load_component(UNet2DConditionModel, source, "unet", "UNet", torch_dtype=dtype)
        vae = load_component(AutoencoderKL, source, "vae", "VAE", torch_dtype=dtype)
        encoder = load_component(CLIPVisionModelWithProjection, source, "image_encoder", "CLIP image encoder",
                                 **transformers_dtype_kwarg(dtype))
        processor = load_component(CLIPImageProcessor, source, "feature_extractor", "CLIP image processor")
        scheduler = load_component(DDPMScheduler, source, "scheduler", "noise scheduler")
        projection = load_camera_projection(source)
        return cls(unet, vae, encoder, processor, projection, scheduler, options=options, device=device, dtype=dtype)

    # ------------------------------------------------------------------ conditioning
    def set_condition(self, condition) -> None:
        """Encode the input image (3,H,W) in [0,1], composited on white, and keep its camera pose (anything with
        elevation_deg, azimuth_deg and distance, e.g. a one-camera CameraBatch)."""
        super().set_condition(condition)
        image = torch.as_tensor(condition.image)
        if image.dim() != 3 or image.shape[0] != 3:
            raise FastDreamError(f"The input image must be (3, H, W) in [0, 1], got shape {tuple(image.shape)}.")
        pose = condition.pose
        if pose is None or not all(hasattr(pose, k) for k in ("elevation_deg", "azimuth_deg", "distance")):
            raise FastDreamError("Zero-1-to-3 guidance needs the input image's camera pose (elevation, azimuth, "
                                 "distance) to condition on.")
        as_vec = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(-1)[:1].to(self.device)  # noqa: E731
        self.input_pose = (as_vec(pose.elevation_deg), as_vec(pose.azimuth_deg), as_vec(pose.distance))
        image = image.float().clamp(0, 1)[None].to(self.device)
        with torch.no_grad(), self._autocast():
            pixels = self.feature_extractor(images=[image[0].permute(1, 2, 0).cpu().numpy()], do_rescale=False,
                                            return_tensors="pt").pixel_values
            embeds = self.image_encoder(pixels.to(self.device, self.dtype)).image_embeds
            posterior = self.vae.encode((resize_images(image, self.resolution) * 2 - 1).to(self.dtype)).latent_dist
        self.image_embedding = embeds.reshape(1, 1, -1)
        self.image_latents = posterior.mean

    def text_embeddings(self, cameras: Any, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond), each (B, 1, D): the projected image + relative-pose token of each camera, and zeros."""
        if self.image_embedding is None:
            raise FastDreamError("No input image set: call guidance.set_condition(Condition(image=..., pose=...)) "
                                 "before the first step.")
        if cameras is None:
            raise FastDreamError("Zero-1-to-3 guidance needs the cameras of the renders (their pose relative to the "
                                 "input view).")
        vec = lambda v: torch.as_tensor(v).to(self.device, torch.float32, non_blocking=True).reshape(-1)  # noqa: E731
        elev, azim, dist = vec(cameras.elevation_deg), vec(cameras.azimuth_deg), vec(cameras.distance)
        if elev.shape[0] != batch_size:
            raise FastDreamError(f"Got {batch_size} images but {elev.shape[0]} cameras; they must match.")
        pose = relative_pose(elev, azim, dist, *self.input_pose)[:, None, :]
        tokens = torch.cat([self.image_embedding.float().expand(batch_size, -1, -1), pose], dim=-1)
        with torch.no_grad(), self._autocast():
            cond = self.camera_projection(tokens.to(self.dtype))
        return cond, torch.zeros_like(cond)

    # ------------------------------------------------------------------ hooks
    def _encode_text(self, texts: List[str]) -> torch.Tensor:
        raise FastDreamError("Zero-1-to-3 guidance is conditioned on an image, not on text.")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = (resize_images(images, self.resolution) * 2.0 - 1.0).to(self.dtype)
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """z_t: (N, 2C, h, w), the noisy latents with the (or zeroed) input-image latents concatenated."""
        return self.unet(z_t, t, encoder_hidden_states=text_embeddings, return_dict=False)[0]

    def guided_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                     uncond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = z_t.shape[0]
        image = self.image_latents.to(z_t.dtype).expand(n, -1, -1, -1)
        x = torch.cat([torch.cat([z_t, torch.zeros_like(image)], 1), torch.cat([z_t, image], 1)])
        with torch.no_grad(), self._autocast():
            eps = self.predict_noise(x, torch.cat([t, t]), torch.cat([uncond, cond])).float()
        eps_u, eps_c = eps[:n], eps[n:]
        return eps_u + self.options.guidance_scale * (eps_c - eps_u), eps_c, eps_u


def load_camera_projection(source: str):
    """The camera projection of a zero123 folder: clip_camera_projection/ (threestudio / stable-dreamfusion
    layout) or cc_projection/ (the diffusers community pipeline's `projection` linear layer)."""
    cls = camera_projection_class()
    local = Path(source)
    if local.is_dir() and not (local / "clip_camera_projection").is_dir() and (local / "cc_projection").is_dir():
        return _load_cc_projection(local / "cc_projection", cls)
    return load_component(cls, source, "clip_camera_projection", "camera projection")


def _load_cc_projection(folder: Path, cls):
    try:
        config = json.loads((folder / "config.json").read_text())
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"no weights in {folder}")
        if files[0].suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(files[0]))
        else:
            state = torch.load(files[0], map_location="cpu", weights_only=True)
        out_dim = int(config.get("out_channel", 768))
        module = cls(embedding_dim=out_dim, additional_embeddings=int(config.get("in_channel", out_dim + 4)) - out_dim)
        module.load_state_dict({k.replace("projection.", "proj."): v for k, v in state.items()})
    except Exception as exc:
        raise FastDreamError(f"Could not load the camera projection ('cc_projection/') of '{folder.parent}': "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}.") from None
    return module


def _is_zero123(pipeline_class: str, unet_config: Optional[dict]) -> bool:
    if "zero123" in pipeline_class.lower() or "zero1to3" in pipeline_class.lower():
        return True
    return not pipeline_class and (unet_config or {}).get("in_channels") == 8


def _configure_run(config) -> None:
    """Zero-1-to-3 was trained on objects over white: renders use a fixed white background; its CFG scale is ~3."""
    text_default = type(config.guidance).__dataclass_fields__["guidance_scale"].default
    if config.guidance.guidance_scale == text_default:
        config.guidance.guidance_scale = DEFAULT_GUIDANCE_SCALE
    if config.background != "fixed" or tuple(config.background_color) != (1.0, 1.0, 1.0):
        log.info("fastdream: Zero-1-to-3 guidance sees objects over white; using background=fixed, white.")
        config.background, config.background_color = "fixed", (1.0, 1.0, 1.0)


register(GuidanceFamily(
    name="zero123", description="Zero-1-to-3 novel-view guidance from one input image (zero123-xl, Stable-Zero123)",
    default_model=DEFAULT_ZERO123_MODEL, recognise=_is_zero123, conditioning=("image", "pose"),
    option_defaults={"view_dependent": False, "guidance_scale": DEFAULT_GUIDANCE_SCALE}, configure_run=_configure_run,
    create=lambda source, **kw: Zero123Guidance.from_pretrained(source, **kw)))
