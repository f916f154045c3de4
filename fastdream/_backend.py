"""Chooses between the native extension (fastdream._C) and the plain-PyTorch ops.

The choice is made once per process and changed only on purpose:

    from fastdream.ops import use_backend
    with use_backend("torch"):      # the reference ops inside the block
        ...
    set_backend("native")           # from now on (returns the previous choice)

"torch" forces the reference ops, "native" requires the extension (error if missing), "auto" uses
the extension when it is importable. The environment variable FASTDREAM_BACKEND gives the initial
choice only (read once, on first use); the run configuration's `backend` key applies to a run. The
extension is imported lazily, on first use.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

from .errors import FastDreamError

log = logging.getLogger("fastdream")

BACKENDS = ("auto", "torch", "native")
_state = {"loaded": False, "module": None, "error": None, "choice": None}


def _check(value: str, source: str) -> str:
    value = (value or "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise FastDreamError(f"{source}={value!r} is not understood; use one of {', '.join(BACKENDS)}.")
    return value


def requested_backend() -> str:
    """The current choice: auto | torch | native (initially FASTDREAM_BACKEND, default auto)."""
    if _state["choice"] is None:
        _state["choice"] = _check(os.environ.get("FASTDREAM_BACKEND", "auto"), "FASTDREAM_BACKEND")
    return _state["choice"]


def set_backend(name: str) -> str:
    """Choose the backend for the rest of the process; returns the previous choice."""
    previous = requested_backend()
    _state["choice"] = _check(name, "backend")
    if _state["choice"] == "native":
        native_module()  # fail now, not at the first op
    return previous


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[str]:
    """Use backend `name` inside the block (None or "" keeps the current choice); yields the choice in force."""
    if not name:
        yield requested_backend()
        return
    previous = set_backend(name)
    try:
        yield _state["choice"]
    finally:
        _state["choice"] = previous


def extension():
    """The native extension module, imported on first call, or None when it cannot be loaded
    (whatever backend is chosen); `extension_error()` then says why."""
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


def extension_error() -> Optional[BaseException]:
    extension()
    return _state["error"]


def native_module() -> Optional[object]:
    """The loaded extension module, or None when the torch backend is in use."""
    backend = requested_backend()
    if backend == "torch":
        return None
    module = extension()
    if module is None and backend == "native":
        raise FastDreamError(
            f"The native backend was asked for but the native extension could not be loaded ({_state['error']}). "
            "Rebuild it with `pip install -e .` (with a C++ compiler and, for CUDA, CUDA_HOME set), or use the "
            "torch backend (FASTDREAM_BACKEND=torch, or unset it)."
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
