"""Where and how a job runs: device resolution, out-of-memory detection, versions and peak memory.

Every command and library entry point resolves devices here, so "auto", "cpu", "cuda:N" and the
"CUDA asked for but not available" error mean the same everywhere."""
from __future__ import annotations

import platform
import sys
from typing import Any, Dict, Optional

import torch

from .errors import FastDreamError


def resolve_device(name: Any = None, what: str = "--device") -> torch.device:
    """None/""/"auto" -> cuda when available, else cpu; a torch.device or a string such as "cuda:1" otherwise."""
    if isinstance(name, torch.device):
        device = name
    elif name in ("", "auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise FastDreamError(f"Unknown device {name!r} for {what}; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastDreamError(f"{what} {name} was asked for but CUDA is not available on this machine (or in this "
                             "PyTorch build); use --device cpu.")
    return device


def is_oom(exc: BaseException) -> bool:
    """True for CUDA (or host) out-of-memory errors, whichever PyTorch class raised them."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def versions(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """fastdream, torch, python, the ops backend on `device` and the versions of loaded key libraries."""
    from . import _backend
    from ._version import __version__

    out = {"fastdream": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        out["backend"] = _backend.backend_name(device if device is not None else "cpu")
    except Exception:  # a broken native build must not break a checkpoint
        out["backend"] = "unknown"
    for name in ("numpy", "diffusers", "transformers", "trimesh", "mcubes"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "unknown")
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def peak_memory(device: torch.device) -> Dict[str, Any]:
    """Peak GPU memory allocated on `device` (CUDA) and the process's peak resident host memory, in bytes."""
    out: Dict[str, Any] = {}
    if device.type == "cuda":
        out["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        out["peak_host_memory_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        pass
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
