"""fastdream: fast text-to-3D (DreamFusion) on hash-grid radiance fields with native kernels."""
from __future__ import annotations

from ._version import __version__
from .errors import FastDreamError, InputError


def info(file=None) -> dict:
    """Print and return the backend, compiled CUDA archs, torch/CUDA versions and optional accelerators."""
    from .diagnostics import collect_info, format_info

    data = collect_info()
    print(format_info(data), file=file)
    return data


__all__ = ["__version__", "FastDreamError", "InputError", "info"]
