"""Tiny random diffusion pipelines built from configs, for offline tests and quick benchmarks.

Nothing here downloads anything: every model is built from a small config with random weights and
written with ``save_pretrained`` in the same folder layout as the real hub models, so code under test
loads it through exactly the path users run (``fastdream.guidance.load_guidance(folder, ...)``).

    from tests.tiny_models import make_tiny_sd_pipeline, make_tiny_if_pipeline
    folder = make_tiny_sd_pipeline(tmp_path / "tiny-sd")   # -> folder (pathlib.Path)
    folder = make_tiny_if_pipeline(tmp_path / "tiny-if")
    folder = make_tiny_zero123_pipeline(tmp_path / "tiny-zero123")

Sizes (CPU, fp32): SD-like -- UNet on 8x8x4 latents, VAE factor 4 (32x32 model resolution); IF-like --
pixel UNet at 16x16. A few hundred thousand parameters each; one SDS step takes milliseconds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]

TEXT_DIM = 32  # hidden size of the tiny text encoders == UNet cross-attention dim
MAX_TOKENS = 16  # tokenizer model_max_length (real CLIP: 77)


def _bytes_to_unicode() -> dict:
    """The byte -> printable unicode table of GPT-2 / CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def make_tiny_clip_tokenizer(folder: PathLike, model_max_length: int = MAX_TOKENS):
    """A CLIPTokenizer with a ~530-token vocabulary (every byte, alone and word-final, plus a few merges)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = ["v i", "vi e", "vie w</w>", "f r", "o n"]  # a few real merges ("view" is one token)
    for m in merges:
        vocab_list.append(m.replace(" ", ""))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    import inspect

    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5
        tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                            model_max_length=model_max_length)
    else:  # transformers 4.x: file paths
        tok = CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                            model_max_length=model_max_length)
    return tok


def make_tiny_t5_tokenizer(model_max_length: int = MAX_TOKENS):
    """A T5Tokenizer (Unigram) over single characters: enough to tokenize any ASCII prompt."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.'-!?":
        pieces.append((c, -3.0))
        pieces.append(("\u2581" + c, -3.5))
    for w in ("view", "front", "side", "back", "overhead", "a"):
        pieces.append(("\u2581" + w, -1.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_unet_config(in_channels: int = 4, out_channels: int = 4, sample_size: int = 8,
                     cross_attention_dim: int = TEXT_DIM) -> dict:
    return dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        use_linear_projection=True,
    )


def tiny_if_unet_config(sample_size: int = 16, text_dim: int = TEXT_DIM) -> dict:
    """IF stage-I-like UNet: pixel space, noise + variance output, text added-KV attention blocks."""
    return dict(
        sample_size=sample_size,
        in_channels=3,
        out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=64,
        encoder_hid_dim=text_dim,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        norm_num_groups=8,
    )


def tiny_vae_config() -> dict:
    """Three encoder blocks -> downsampling factor 4: 8x8 latents <-> 32x32 images."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def _seed(seed: int):
    import torch

    torch.manual_seed(seed)


def make_tiny_sd_pipeline(folder: PathLike, seed: int = 0) -> Path:
    """Write a tiny random Stable-Diffusion-like pipeline (StableDiffusionPipeline layout) to ``folder``.

    UNet on 8x8x4 latents, VAE with downsampling factor 4 (model resolution 32x32), CLIP text encoder
    of width 32 with 2 layers. Returns ``folder`` as a Path. Idempotent: an existing complete folder is reused.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    if (folder / "model_index.json").exists() and (folder / "unet").is_dir():
        return folder
    _seed(seed)
    tok_dir = folder / "_tokenizer_src"
    tokenizer = make_tiny_clip_tokenizer(tok_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(**tiny_vae_config())
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return folder


def make_tiny_if_pipeline(folder: PathLike, seed: int = 0) -> Path:
    """Write a tiny random DeepFloyd-IF-like stage-I pipeline (IFPipeline layout) to ``folder``.

    Pixel-space UNet on 16x16x3 images predicting noise and variance (out_channels 6), tiny T5 encoder
    (width 32) and a character-level T5 tokenizer, squaredcos DDPM schedule. Returns ``folder``.
    """
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    if (folder / "model_index.json").exists() and (folder / "unet").is_dir():
        return folder
    _seed(seed)
    tokenizer = make_tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=0,
    ))
    unet = UNet2DConditionModel(**tiny_if_unet_config())
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000,
                              variance_type="learned_range", clip_sample=True)
    pipe = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None,
                      requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def make_tiny_zero123_pipeline(folder: PathLike, seed: int = 0) -> Path:
    """Write a tiny random Zero-1-to-3 model in the diffusers layout of 'bennyguo/zero123-xl-diffusers' to
    ``folder``: an 8-input-channel UNet on 8x8x4 latents (noisy latents + input-image latents), the tiny VAE
    (factor 4, model resolution 32), a CLIP vision encoder with projection (width 32, 32x32 images), its
    image processor, a DDPM scheduler and the camera projection (32 + 4 -> 32). Returns ``folder``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from fastdream.guidance.zero123 import camera_projection_class

    folder = Path(folder)
    if (folder / "model_index.json").exists() and (folder / "clip_camera_projection").is_dir():
        return folder
    _seed(seed)
    UNet2DConditionModel(**tiny_unet_config(in_channels=8)).save_pretrained(folder / "unet")
    AutoencoderKL(**tiny_vae_config()).save_pretrained(folder / "vae")
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=TEXT_DIM)).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  clip_sample=False).save_pretrained(folder / "scheduler")
    camera_projection_class()(embedding_dim=TEXT_DIM).save_pretrained(folder / "clip_camera_projection")
    index = {"_class_name": "Zero123Pipeline", "_diffusers_version": "0.19.3",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
             "feature_extractor": ["transformers", "CLIPImageProcessor"], "scheduler": ["diffusers", "DDPMScheduler"],
             "clip_camera_projection": ["zero123", "CLIPCameraProjection"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


if __name__ == "__main__":  # python tests/tiny_models.py OUTDIR
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")
    print(make_tiny_sd_pipeline(out / "tiny-sd"))
    print(make_tiny_if_pipeline(out / "tiny-if"))
    print(make_tiny_zero123_pipeline(out / "tiny-zero123"))
