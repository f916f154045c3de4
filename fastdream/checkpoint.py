"""Checkpoints: written atomically (temp file, fsync, rename) and read back with clear errors."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .errors import FastDreamError

FORMAT_VERSION = 1


def save_checkpoint(path, state: Dict[str, Any]) -> Path:
    """Write {"format_version", "kind", ...state} to path without ever leaving a half-written file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path, kind: Optional[str] = None, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint, checking it is complete, of our format, and (if given) of the expected kind."""
    path = Path(path)
    if not path.is_file():
        raise FastDreamError(f"Checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise FastDreamError(
            f"Checkpoint {path} could not be read ({type(exc).__name__}: {exc}). The file is corrupt or truncated "
            "(for example by a disk that filled up); delete it to fall back to an earlier checkpoint, or start over with --force."
        ) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise FastDreamError(f"{path} is not a fastdream checkpoint (no format_version field).")
    if state["format_version"] > FORMAT_VERSION:
        raise FastDreamError(f"Checkpoint {path} has format version {state['format_version']}, newer than this fastdream "
                             f"understands ({FORMAT_VERSION}); upgrade fastdream to read it.")
    if kind is not None and state.get("kind") != kind:
        raise FastDreamError(f"Checkpoint {path} holds a {state.get('kind')!r} run, not a {kind!r} run.")
    return state


def latest_checkpoint(folder) -> Optional[Path]:
    """The newest step_XXXXXXX.pt in folder (by step number), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted(folder.glob("step_*.pt"))
    return candidates[-1] if candidates else None


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"
