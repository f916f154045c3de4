"""SDS guidance from DeepFloyd IF stage I (pixel-space cascaded diffusion, the closest public model
to DreamFusion's Imagen).

Per step: renders (B,3,H,W) in [0,1] -> resize to the UNet's sample size (64x64) -> [-1,1] pixels z
-> SDS directly in pixel space (no VAE). The IF UNet predicts noise *and* a variance
(out_channels = 2 * in_channels, "learned_range"); only the noise half is used. Text embeddings come
from the pipeline's T5 encoder (with its attention mask, as IFPipeline does), max length 77.
Loading reads the IFPipeline folder's subfolders directly (tokenizer, text_encoder, unet, scheduler);
the safety checker and watermarker are never loaded. The hub model 'DeepFloyd/IF-I-XL-v1.0' is
gated: accept its licence on the hub and log in once.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..errors import FastDreamError
from .base import Guidance, GuidanceOptions, resize_images
from .loading import configure_attention, load_shared_components, prepare_module, resolve_device, resolve_dtype
from .registry import GuidanceFamily, register

DEFAULT_IF_MODEL = "DeepFloyd/IF-I-XL-v1.0"


class DeepFloydIFGuidance(Guidance):
    def __init__(self, tokenizer, text_encoder, unet, scheduler, options: Optional[GuidanceOptions] = None,
                 device: Any = None, dtype: Any = None, max_length: int = 77):
        options = (options or GuidanceOptions()).validate()
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        super().__init__(options=options, device=device, dtype=dtype,
                         alphas_cumprod=torch.as_tensor(scheduler.alphas_cumprod))
        self.tokenizer = tokenizer
        self.max_length = min(max_length, int(getattr(tokenizer, "model_max_length", max_length) or max_length))
        self.text_encoder = prepare_module(text_encoder, device, dtype)
        self.unet = prepare_module(unet, device, dtype, options.channels_last)
        self.resolution = int(unet.config.sample_size)
        self.in_channels = int(unet.config.in_channels)
        self.predicts_variance = int(unet.config.out_channels) == 2 * self.in_channels
        self.attention = self.set_attention(options.attention)
        self._unet_forward = torch.compile(self.unet) if options.compile_unet else self.unet

    @classmethod
    def from_pretrained(cls, source: str, device: Any = None, dtype: Any = None,
                        options: Optional[GuidanceOptions] = None) -> "DeepFloydIFGuidance":
        from transformers import T5EncoderModel

        parts, device, dtype, _ = load_shared_components(source, device, dtype, T5EncoderModel, "T5 text encoder")
        return cls(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["scheduler"], options=options,
                   device=device, dtype=dtype)

    def set_attention(self, backend: str) -> str:
        self.attention = configure_attention(self.unet, backend, self.device)
        return self.attention

    def _encode_text(self, texts: List[str]) -> torch.Tensor:
        tok = self.tokenizer([t.lower().strip() for t in texts], padding="max_length", max_length=self.max_length,
                             truncation=True, add_special_tokens=True, return_tensors="pt")
        out = self.text_encoder(tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device))
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return hidden.to(self.dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return (resize_images(images, self.resolution) * 2.0 - 1.0).to(self.dtype)

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        if self.options.channels_last and self.device.type == "cuda":
            z_t = z_t.contiguous(memory_format=torch.channels_last)
        out = self._unet_forward(z_t, t, encoder_hidden_states=text_embeddings, return_dict=False)[0]
        if self.predicts_variance:
            out = out[:, : self.in_channels]
        return out


def _is_deepfloyd_if(pipeline_class: str, unet_config: Optional[dict]) -> bool:
    if pipeline_class.startswith("IF"):
        if "SuperResolution" in pipeline_class:
            raise FastDreamError(f"This is a DeepFloyd IF super-resolution stage ({pipeline_class}); SDS needs the "
                                 "stage-I model, e.g. 'DeepFloyd/IF-I-XL-v1.0'.")
        return True
    return not pipeline_class and (unet_config or {}).get("in_channels") == 3  # a pixel-space UNet


register(GuidanceFamily(
    name="if", description="DeepFloyd IF stage I (IFPipeline)", default_model=DEFAULT_IF_MODEL,
    recognise=_is_deepfloyd_if, create=lambda source, **kw: DeepFloydIFGuidance.from_pretrained(source, **kw)))
