"""Finding and loading diffusion models (hub id or local folder) with clear errors.

``load_guidance`` is the entry point for a model: it resolves it (local diffusers folder, or a hub
id through the Hugging Face cache), reads ``model_index.json`` to find the registered family that
recognises it (``registry.detect``), and builds the guidance on the requested device and dtype;
``build_guidance`` does the same from a family name (``--guidance``). Every failure of the hub or of the
model files becomes one ``FastDreamError`` paragraph naming the model and what to do.
diffusers/transformers are imported only inside these functions.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch

from .. import runtime
from ..errors import FastDreamError
from . import registry

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def resolve_device(device: Any = None) -> torch.device:
    return runtime.resolve_device(device, what="the guidance model's device")


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """None -> float16 on CUDA, float32 elsewhere; strings like 'fp16'/'bf16'/'fp32' accepted."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        out = dtype
    elif isinstance(dtype, str) and dtype.lower().replace("torch.", "") in DTYPES:
        out = DTYPES[dtype.lower().replace("torch.", "")]
    else:
        raise FastDreamError(f"Unknown dtype {dtype!r} for the guidance model; use float16, bfloat16 or float32.")
    if out not in (torch.float16, torch.bfloat16, torch.float32):
        raise FastDreamError(f"Unsupported dtype {out} for the guidance model; use float16, bfloat16 or float32.")
    if device.type == "cpu" and out == torch.float16:
        raise FastDreamError("float16 is not supported for the guidance model on the CPU; use float32 "
                             "(the default there) or bfloat16.")
    return out


def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old hub
        return False


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", "\\")) or "\\" in name or name.count("/") > 1
            or re.match(r"^[A-Za-z]:", name) is not None or not _HUB_ID.match(name))


def resolve_model(name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL) -> Tuple[str, Optional[dict], bool]:
    """(source for from_pretrained, parsed model_index.json or None, is_local).

    Local folders are used directly; hub ids are looked up in the Hugging Face cache first (a complete
    cached snapshot is used as a local folder, with no network access), and downloaded when the hub can be
    reached; without a network the error comes at once instead of after the hub client's retries.
    Raises FastDreamError with what to do when the model cannot be found.
    """
    if name_or_path is None or str(name_or_path).strip() == "":
        raise FastDreamError(f"No guidance model given; pass a hub id such as '{DEFAULT_MODEL}' or a local folder.")
    name = os.fspath(name_or_path)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        folder = Path(expanded)
        index = folder / "model_index.json"
        if index.is_file():
            return str(folder), _read_index(index, name), True
        if (folder / "unet" / "config.json").is_file():
            return str(folder), None, True
        raise FastDreamError(
            f"The guidance model folder '{folder}' is not a diffusers pipeline: it has no model_index.json "
            "and no unet/ subfolder. Pass the folder written by `pipeline.save_pretrained(...)` (or a hub "
            f"snapshot), e.g. a copy of '{DEFAULT_MODEL}'.")
    if os.path.exists(expanded):
        raise FastDreamError(f"The guidance model path '{name}' is a file, not a diffusers pipeline folder.")
    if _looks_like_path(name):
        raise FastDreamError(
            f"The guidance model folder '{os.path.abspath(expanded)}' does not exist. Pass an existing local "
            "diffusers pipeline folder (with model_index.json, unet/, text_encoder/, ...) or a Hugging Face hub "
            f"id such as '{DEFAULT_MODEL}'.")
    # The cache first: a model downloaded once loads without touching the network (no retries when offline).
    cached = cached_snapshot(name)
    if cached is not None:
        return str(cached), _read_index(cached / "model_index.json", name), True
    if not hub_offline() and not hub_reachable():
        raise FastDreamError(
            f"The guidance model '{name}' is not in the local Hugging Face cache and the Hugging Face hub "
            f"({_hub_endpoint()}) cannot be reached (no network connection). {_download_hint(name)}")
    return name, _hub_model_index(name), False


def cached_snapshot(repo_id: str) -> Optional[Path]:
    """The cached snapshot folder of a hub model when it looks complete (model_index.json and full-precision UNet
    weights; a cache holding only the fp16 variant is left to the hub client, which fetches what is missing), else None."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (or an unusable cache): the hub decides
        return None
    unet = folder / "unet"
    complete = ((folder / "model_index.json").is_file() and (unet / "config.json").is_file()
                and any((unet / f"diffusion_pytorch_model.{ext}").is_file()
                        for ext in ("safetensors", "bin", "safetensors.index.json", "bin.index.json")))
    return folder if complete else None


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except Exception:  # pragma: no cover
        return "https://huggingface.co"


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick request to the hub (proxies from the environment apply): False when there is no network."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(_hub_endpoint(), method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:  # the hub answered, if not with 200
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def _download_hint(repo_id: str) -> str:
    return (f"Download it once with internet access (e.g. `huggingface-cli download {repo_id}`, or run "
            f"fastdream once online), or pass the path of a local copy of the model folder instead.")


def _read_index(path: Path, name: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FastDreamError(f"Cannot read {path} of guidance model '{name}': {exc}.") from None


def _hub_model_index(repo_id: str) -> dict:
    """Fetch (or find in the cache) model_index.json of a hub model, translating hub errors."""
    offline = hub_offline()
    todo = _download_hint(repo_id)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hub_errors
    except ImportError:  # pragma: no cover
        raise FastDreamError("huggingface_hub is not installed; `pip install diffusers transformers`.") from None
    try:
        path = hf_hub_download(repo_id, "model_index.json", local_files_only=offline)
    except hub_errors.GatedRepoError:
        raise FastDreamError(
            f"The model '{repo_id}' is gated on the Hugging Face hub: accept its licence on "
            f"https://huggingface.co/{repo_id} and log in with `huggingface-cli login`, then retry, or pass a "
            "local copy of the model folder.") from None
    except hub_errors.RepositoryNotFoundError:
        raise FastDreamError(
            f"Unknown guidance model '{repo_id}': no such repository on the Hugging Face hub (or it is "
            f"private). Check the spelling (the default is '{DEFAULT_MODEL}') or pass a local model folder; "
            f"if you meant a local folder, '{os.path.abspath(repo_id)}' does not exist.") from None
    except (hub_errors.LocalEntryNotFoundError, getattr(hub_errors, "OfflineModeIsEnabled", OSError)):
        why = ("the hub is switched off (HF_HUB_OFFLINE=1)" if offline
               else "the Hugging Face hub cannot be reached (no network connection)")
        raise FastDreamError(
            f"The guidance model '{repo_id}' is not in the local Hugging Face cache and {why}. {todo} "
            f"(If you meant a local folder, '{os.path.abspath(repo_id)}' does not exist.)") from None
    except hub_errors.EntryNotFoundError:
        raise FastDreamError(
            f"The hub repository '{repo_id}' has no model_index.json: it is not a diffusers pipeline. Use a "
            f"Stable Diffusion 1.x/2.x or DeepFloyd IF stage-I pipeline such as '{DEFAULT_MODEL}'.") from None
    except Exception as exc:  # network errors, HTTP errors, ...
        raise FastDreamError(
            f"Could not fetch the guidance model '{repo_id}' from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). {todo}") from None
    return _read_index(Path(path), repo_id)


def model_family(index: Optional[dict], source: str, is_local: bool) -> str:
    """The registered family ('sd', 'if', ...) of a diffusers pipeline, from model_index.json `_class_name`
    (or, without one, the UNet's config)."""
    cls = (index or {}).get("_class_name", "") or ""
    if isinstance(cls, (list, tuple)):  # a custom pipeline names (module, class)
        cls = str(cls[-1])
    unet = None
    if not cls and is_local:
        try:
            unet = json.loads((Path(source) / "unet" / "config.json").read_text())
        except (OSError, ValueError):
            pass
    return registry.detect(cls, unet, source).name


def transformers_dtype_kwarg(dtype: torch.dtype) -> dict:
    """``{"dtype": ...}`` for transformers >= 4.56 (5.x), ``{"torch_dtype": ...}`` before."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_component(cls, source: str, subfolder: str, what: str, **kwargs):
    """``cls.from_pretrained(source, subfolder=...)`` with hub/file errors turned into FastDreamError."""
    offline = hub_offline()
    try:
        return cls.from_pretrained(source, subfolder=subfolder, local_files_only=offline, **kwargs)
    except Exception as exc:
        if kwargs.get("variant") is not None:  # no fp16 variant in this repo: fall back to the full files
            kwargs = {k: v for k, v in kwargs.items() if k != "variant"}
            return load_component(cls, source, subfolder, what, **kwargs)
        if "out of memory" in str(exc).lower():
            from .base import out_of_memory_error

            raise out_of_memory_error(exc, f"loading the {what} of '{source}'") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = (" The hub is offline (HF_HUB_OFFLINE=1): download the model once with internet access or "
                "pass a complete local folder." if offline else "")
        raise FastDreamError(
            f"Could not load the {what} ('{subfolder}/') of guidance model '{source}': {type(exc).__name__}: "
            f"{first[:300]}. The model folder may be incomplete or of an unsupported kind; re-download it or "
            f"use a Stable Diffusion 1.x/2.x or DeepFloyd IF stage-I pipeline.{hint}") from None


def configure_attention(module: torch.nn.Module, backend: str, device: torch.device) -> str:
    """Set the attention processors of a diffusers model; returns the backend actually used.

    auto -> xformers when importable and on CUDA, else sdpa; sdpa -> torch scaled_dot_product_attention
    (flash / memory-efficient kernels on CUDA); math -> plain softmax(QK^T)V in PyTorch ops.
    """
    from diffusers.models import attention_processor as ap

    if backend == "auto":
        backend = "xformers" if (device.type == "cuda" and _xformers_available()) else "sdpa"
    if backend == "xformers":
        if not _xformers_available():
            raise FastDreamError("attention='xformers' was requested but xformers is not installed; "
                                 "`pip install xformers` (matching your torch build) or use attention='sdpa'.")
        if device.type != "cuda":
            raise FastDreamError("attention='xformers' needs a CUDA device; use attention='sdpa' on the CPU.")
        module.enable_xformers_memory_efficient_attention()
        return backend
    if not hasattr(module, "attn_processors"):
        return backend
    procs = {}
    for name, proc in module.attn_processors.items():
        added_kv = "AddedKV" in type(proc).__name__
        if backend == "sdpa":
            procs[name] = ap.AttnAddedKVProcessor2_0() if added_kv else ap.AttnProcessor2_0()
        else:
            procs[name] = ap.AttnAddedKVProcessor() if added_kv else ap.AttnProcessor()
    if procs:
        module.set_attn_processor(procs)
    return backend


def _xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401

        return True
    except Exception:
        return False


def load_guidance(name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL, device: Any = None, dtype: Any = None,
                  options=None, **option_overrides: Any):
    """Load SDS guidance from a hub id or a local diffusers folder.

    ``options`` is a GuidanceOptions (or None for defaults); keyword arguments override its fields,
    e.g. ``load_guidance("stabilityai/stable-diffusion-2-1-base", "cuda", guidance_scale=50)``.
    The family (Stable Diffusion, DeepFloyd IF, ...) is the registered one that recognises the folder; without
    ``options`` its option defaults (`GuidanceFamily.option_defaults`) apply under the keyword overrides.
    dtype: None -> float16 on CUDA, float32 on CPU.
    """
    from .base import GuidanceOptions

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, index, is_local = resolve_model(name_or_path)
    family = registry.get(model_family(index, str(name_or_path), is_local))
    if options is None:  # the family's own defaults (e.g. zero123's CFG scale) under the explicit overrides
        option_overrides = {**family.option_defaults, **option_overrides}
    opts = GuidanceOptions.from_kwargs(options, **option_overrides)
    return family.create(source, device=dev, dtype=dt, options=opts)


def build_guidance(kind: str, model: str = "", device: Any = None, dtype: Any = None,
                   options: Optional[dict] = None, **context: Any):
    """The guidance of family `kind`: for model families, `model` (default: the family's default model;
    the folder's own family wins, as with load_guidance); otherwise built from the run's `context`."""
    from .base import GuidanceOptions

    family = registry.get(kind)
    options = {**family.option_defaults, **(options or {})}
    if family.needs_model:
        return load_guidance(model or family.default_model, device, dtype=dtype, **options)
    opts = GuidanceOptions.from_kwargs(None, **options)
    return family.create(None, device=resolve_device(device), dtype=dtype, options=opts, **context)


def prepare_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                   channels_last: bool = False) -> torch.nn.Module:
    """Frozen, eval-mode, on device/dtype (channels_last on CUDA if asked); OOM -> FastDreamError."""
    module.requires_grad_(False)
    module.eval()
    try:
        params = list(module.parameters())
        if params and any(p.dtype != dtype for p in params if p.is_floating_point()):
            module.to(dtype=dtype)
        module.to(device=device)
        if channels_last and device.type == "cuda":
            module.to(memory_format=torch.channels_last)
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            from .base import out_of_memory_error

            raise out_of_memory_error(exc, f"moving {type(module).__name__} to {device}") from None
        raise
    return module


def load_shared_components(source: str, device: Any, dtype: Any, text_encoder_cls, text_encoder_label: str):
    """What Stable Diffusion and DeepFloyd IF load alike: tokenizer, text encoder, UNet and noise scheduler.

    Returns (components dict, device, dtype, variant); variant is "fp16" for half weights (falls back to
    the full files when a model has no fp16 variant)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    variant = "fp16" if dtype == torch.float16 else None
    components = {
        "tokenizer": load_component(AutoTokenizer, source, "tokenizer", "tokenizer"),
        "text_encoder": load_component(text_encoder_cls, source, "text_encoder", text_encoder_label, variant=variant,
                                       **transformers_dtype_kwarg(dtype)),
        "unet": load_component(UNet2DConditionModel, source, "unet", "UNet", torch_dtype=dtype, variant=variant),
        "scheduler": load_component(DDPMScheduler, source, "scheduler", "noise scheduler"),
    }
    return components, device, dtype, variant
