"""SDS guidance from Stable Diffusion 1.x / 2.x (latent diffusion).

Per step: renders (B,3,H,W) in [0,1] -> bilinear resize to the model resolution (UNet sample_size x
VAE factor, 512 for SD 2.1-base) -> [-1,1] -> VAE encoder (differentiable; the posterior *mean* is
used, times the VAE scaling factor) -> latents z -> SDS (see ``base``): one UNet call on the
[uncond; cond] batch, CFG, gradient w(t) (eps_hat - eps) on z, back through the encoder to the renders.

``latent_mode="linear"`` replaces the VAE encoder with a per-pixel linear map RGB -> latent applied
at latent resolution (64x64 for SD): renders can be made at 64x64 and the 512x512 encoder (forward
and backward, the largest activation memory and a large share of the step time at batch 4) is
skipped. The trade-off: the map only reproduces the latents' colour content, not texture/edges, so
it suits coarse early training and textureless shading; the VAE path is exact and the default. The
map is fitted once at load by least squares against this model's own VAE on smooth random colour
images, so it works for any SD checkpoint (and for random test models).

Latent warm-up (``latent_warmup`` > 0, stable-dreamfusion's ``--latent_iter_ratio``, after Fantasia3D):
for that first fraction of training the render itself is the latent: its RGB and opacity, resized to the
latent resolution and mapped to [-1, 1], form the 4 latent channels, so neither the VAE encoder nor its
backward runs and the renders can be made at latent resolution. The UNet then shapes geometry and
coarse layout only (the channels are not real latents); afterwards the VAE path (or latent_mode) takes
over. Off by default: DreamFusion and threestudio always encode the render, and the UNet's score on
non-latent inputs is a heuristic, which stable-dreamfusion also leaves off by default.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn.functional as F

from ..errors import FastDreamError
from .base import Guidance, GuidanceOptions, resize_images
from .loading import (configure_attention, load_component, load_shared_components, prepare_module, resolve_device,
                      resolve_dtype)
from .registry import GuidanceFamily, register


class StableDiffusionGuidance(Guidance):
    """Stable Diffusion 1.x/2.x SDS guidance. Build with ``load_guidance`` / ``from_pretrained``, or
    directly from diffusers/transformers modules (benchmarks build random models from configs)."""

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, options: Optional[GuidanceOptions] = None,
                 device: Any = None, dtype: Any = None):
        options = (options or GuidanceOptions()).validate()
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        super().__init__(options=options, device=device, dtype=dtype,
                         alphas_cumprod=torch.as_tensor(scheduler.alphas_cumprod),
                         prediction_type=scheduler.config.get("prediction_type", "epsilon"))
        self.tokenizer = tokenizer
        self.text_encoder = prepare_module(text_encoder, device, dtype)
        self.unet = prepare_module(unet, device, dtype, options.channels_last)
        self.vae = prepare_module(vae, device, dtype, options.channels_last)
        if hasattr(self.vae, "decoder"):  # SDS only encodes; drop the decoder's memory
            self.vae.decoder = None
            if hasattr(self.vae, "post_quant_conv"):
                self.vae.post_quant_conv = None
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_resolution = int(unet.config.sample_size)
        self.resolution = self.latent_resolution * self.vae_scale_factor
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.attention = self.set_attention(options.attention)
        self._unet_forward = unet
        if options.compile_unet:
            self._unet_forward = torch.compile(self.unet)
        self.linear_weight: Optional[torch.Tensor] = None  # (C, 3)
        self.linear_bias: Optional[torch.Tensor] = None  # (C,)
        if options.latent_mode == "linear":
            self.fit_linear_latent_map()

    @classmethod
    def from_pretrained(cls, source: str, device: Any = None, dtype: Any = None,
                        options: Optional[GuidanceOptions] = None) -> "StableDiffusionGuidance":
        """Load the tokenizer, text encoder, UNet, VAE and scheduler of a diffusers SD folder / hub id."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        parts, device, dtype, variant = load_shared_components(source, device, dtype, CLIPTextModel, "text encoder")
        vae = load_component(AutoencoderKL, source, "vae", "VAE", torch_dtype=dtype, variant=variant)
        return cls(parts["tokenizer"], parts["text_encoder"], parts["unet"], vae, parts["scheduler"], options=options,
                   device=device, dtype=dtype)

    # ------------------------------------------------------------------ configuration
    def set_attention(self, backend: str) -> str:
        """Switch the attention backend of UNet and VAE ('auto'|'xformers'|'sdpa'|'math')."""
        used = configure_attention(self.unet, backend, self.device)
        configure_attention(self.vae, used, self.device)
        self.attention = used
        return used

    # ------------------------------------------------------------------ hooks
    def _encode_text(self, texts: List[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        out = self.text_encoder(tok.input_ids.to(self.device))
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return hidden.to(self.dtype)

    def _vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        """[-1,1] images at model resolution -> scaled latents (posterior mean)."""
        x = x.to(self.dtype)
        if self.options.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        posterior = self.vae.encode(x).latent_dist
        mean = posterior.mean if self.shift_factor == 0.0 else posterior.mean - self.shift_factor  # SD 1.x/2.x: 0
        return mean * self.scaling_factor

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.options.latent_mode == "linear":
            x = resize_images(images, self.latent_resolution).float() * 2.0 - 1.0
            z = torch.einsum("bchw,kc->bkhw", x, self.linear_weight) + self.linear_bias.view(1, -1, 1, 1)
            return z.to(self.dtype)
        return self._vae_encode(resize_images(images, self.resolution) * 2.0 - 1.0)

    def in_latent_warmup(self, progress: float) -> bool:
        return float(progress) < self.options.latent_warmup

    def model_input(self, images: torch.Tensor, opacity: Optional[torch.Tensor], progress: float) -> torch.Tensor:
        if not self.in_latent_warmup(progress):
            return self.encode_images(images)
        if opacity is None:
            raise FastDreamError("latent_warmup needs the renders' opacity as the fourth latent channel; pass "
                                 "opacity=(B, 1, H, W) to the guidance call.")
        if self.unet.config.in_channels != 4:
            raise FastDreamError(f"latent_warmup feeds RGB + opacity as a 4-channel latent, but this UNet takes "
                                 f"{self.unet.config.in_channels} channels; leave latent_warmup at 0.")
        rgba = torch.cat([images, opacity.to(images.dtype)], dim=1)
        return (resize_images(rgba, self.latent_resolution) * 2.0 - 1.0).to(self.dtype)

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        if self.options.channels_last and self.device.type == "cuda":
            z_t = z_t.contiguous(memory_format=torch.channels_last)
        return self._unet_forward(z_t, t, encoder_hidden_states=text_embeddings, return_dict=False)[0]

    # ------------------------------------------------------------------ linear latent map
    @torch.no_grad()
    def fit_linear_latent_map(self, n_images: int = 8, seed: int = 0) -> torch.Tensor:
        """Fit latent = W @ (2*rgb-1) + b per pixel against the VAE on smooth random colour images.

        Returns the relative RMS residual of the fit (diagnostic)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        res = self.resolution
        base = torch.rand(n_images, 3, 4, 4, generator=g)
        imgs = F.interpolate(base, size=(res, res), mode="bilinear", align_corners=False)
        lats, rgbs = [], []
        for i in range(0, n_images, 2):
            chunk = imgs[i:i + 2].to(self.device)
            with self._autocast():
                lat = self._vae_encode(chunk * 2.0 - 1.0).float()
            lats.append(lat.cpu())
            rgbs.append(F.interpolate(chunk.float(), size=lat.shape[-2:], mode="area").cpu() * 2.0 - 1.0)
        lat = torch.cat(lats).double()
        rgb = torch.cat(rgbs).double()
        c = lat.shape[1]
        x = torch.cat([rgb.permute(0, 2, 3, 1).reshape(-1, 3), torch.ones(rgb.numel() // 3, 1, dtype=torch.double)], 1)
        y = lat.permute(0, 2, 3, 1).reshape(-1, c)
        sol = torch.linalg.lstsq(x, y).solution  # (4, C)
        self.linear_weight = sol[:3].T.contiguous().float().to(self.device)
        self.linear_bias = sol[3].float().to(self.device)
        resid = (x @ sol - y).pow(2).mean().sqrt() / y.std().clamp_min(1e-12)
        return resid.float()


def _is_stable_diffusion(pipeline_class: str, unet_config: Optional[dict]) -> bool:
    if "zero1to3" in pipeline_class.lower() or "zero123" in pipeline_class.lower():
        return False  # a novel-view model (zero123 family)
    if "StableDiffusion" in pipeline_class or "LatentDiffusion" in pipeline_class:
        if any(k in pipeline_class for k in ("XL", "3", "Upscale", "Depth", "Inpaint")):
            raise FastDreamError(
                f"This is a {pipeline_class}; fastdream's guidance supports Stable Diffusion 1.x/2.x text-to-image "
                "pipelines and DeepFloyd IF stage I (default 'stabilityai/stable-diffusion-2-1-base').")
        return True
    # no model_index.json: a latent UNet (4 input channels) is taken for Stable Diffusion
    # (3 channels: a pixel-space IF UNet; 8: a zero123 UNet that also reads the input image's latents)
    return not pipeline_class and (unet_config or {}).get("in_channels") not in (3, 8)


register(GuidanceFamily(
    name="sd", description="Stable Diffusion 1.x/2.x (StableDiffusionPipeline)",
    default_model="stabilityai/stable-diffusion-2-1-base", recognise=_is_stable_diffusion,
    create=lambda source, **kw: StableDiffusionGuidance.from_pretrained(source, **kw)))
