"""Checkpoints: written atomically (temp file, fsync, rename) and read back with clear errors.

Every checkpoint stores a digest (BLAKE2b) of all its tensors' bytes, shapes and dtypes, checked on
load: a flipped bit in the parameters is an error, not a silently different model. Checkpoints written
before digests existed still load (without that check).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .atomic import temporary_path
from .errors import FastDreamError

log = logging.getLogger("fastdream")

FORMAT_VERSION = 1
DIGEST_KEY = "tensor_digest"


def tensor_digest(state: Any) -> str:
    """BLAKE2b over every tensor in a nested dict/list (its key path, dtype, shape and bytes), in a fixed order."""
    h = hashlib.blake2b(digest_size=16)

    def visit(obj: Any, where: str) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"{where}:{t.dtype}:{tuple(obj.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for key in sorted(obj, key=repr):
                if not (where == "" and key == DIGEST_KEY):
                    visit(obj[key], f"{where}/{key!r}")
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                visit(item, f"{where}/{i}")

    visit(state, "")
    return h.hexdigest()


def save_checkpoint(path, state: Dict[str, Any]) -> Path:
    """Write {"format_version", "kind", ..., "tensor_digest"} to path without ever leaving a half-written file there."""
    path = Path(path)
    payload = {"format_version": FORMAT_VERSION, **state}
    payload[DIGEST_KEY] = tensor_digest(payload)
    with temporary_path(path) as tmp:
        torch.save(payload, tmp)
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
    if DIGEST_KEY not in state:
        log.info("fastdream: checkpoint %s has no digest (written by an older fastdream); loading it unverified.", path)
    elif tensor_digest(state) != state[DIGEST_KEY]:
        raise FastDreamError(
            f"Checkpoint {path} is corrupt: its tensors do not match the digest stored with them (a damaged disk, "
            "copy or download). Delete it to fall back to an earlier checkpoint, or start over with --force.")
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
