"""Chooses between the native extension (fastdream._C) and the plain-PyTorch ops.

FASTDREAM_BACKEND=torch forces the reference ops, =native requires the extension (error if missing),
unset/auto uses the extension when it is importable. The extension is imported lazily, on first use.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from .errors import FastDreamError

log = logging.getLogger("fastdream")

_VALID = ("auto", "torch", "native")
_state = {"loaded": False, "module": None, "error": None}


def requested_backend() -> str:
    value = os.environ.get("FASTDREAM_BACKEND", "auto").strip().lower() or "auto"
    if value not in _VALID:
        raise FastDreamError(f"FASTDREAM_BACKEND={value!r} is not understood; use one of {', '.join(_VALID)}.")
    return value


def _load():
    if not _state["loaded"]:
        _state["loaded"] = True
        try:
            import torch  # noqa: F401  (the extension links against libtorch/libc10: load them first)

            from . import _C  # noqa: F401  (registers torch.ops.fastdream.*)
            _state["module"] = _C
        except Exception as exc:  # ImportError, or an undefined symbol from a stale build
            _state["error"] = exc
            log.info("fastdream: native extension not available (%s); using the PyTorch reference ops.", exc)
    return _state["module"]


def native_module() -> Optional[object]:
    """The loaded extension module, or None when the torch backend is in use."""
    backend = requested_backend()
    if backend == "torch":
        return None
    module = _load()
    if module is None and backend == "native":
        raise FastDreamError(
            f"FASTDREAM_BACKEND=native but the native extension could not be loaded ({_state['error']}). "
            "Rebuild it with `pip install -e .` (with a C++ compiler and, for CUDA, CUDA_HOME set), or unset FASTDREAM_BACKEND."
        )
    return module


def use_native(device) -> bool:
    """True when the native ops should handle tensors on this device."""
    module = native_module()
    if module is None:
        return False
    devices = getattr(module, "compiled_devices", lambda: ("cpu",))()
    return str(getattr(device, "type", device)) in devices


def backend_name(device="cpu") -> str:
    return "native" if use_native(device) else "torch"
