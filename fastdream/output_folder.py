"""What a command may do with its output folder (`--out`), checked before any model loads or data is read.

- The folder must be usable: not a file, not under a file, and on a writable file system.
- `--force` removes only the outputs the command itself writes (a fixed list of names), never the folder,
  and never a folder that holds the command's input (a dataset, a reference scene).
- A folder a run created and then failed in, before its first step, is removed again, so the rerun is
  not blocked by a folder holding only config.yaml.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from .errors import FastDreamError


def check_output_folder(out: Path, option: str = "--out") -> None:
    """Raise a FastDreamError unless `out` is (or can be created as) a writable folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FastDreamError(f"{option} {out} exists and is a file, not a folder; choose another {option}.")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise FastDreamError(f"{option} {out} lies under {existing}, which is a file, not a folder; choose another {option}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "it" if existing == out else f"{existing}, where it would be created,"
        raise FastDreamError(f"{option} {out} is not writable: {what} is read-only (a read-only file system or missing "
                             f"permissions); choose another {option}.")


def refuse_overlap(out: Path, inputs: Iterable[Optional[Path]], option: str = "--out") -> None:
    """Refuse an output folder that is, or contains, one of the command's inputs (so --force cannot touch them)."""
    out_r = Path(out).resolve()
    for item in inputs:
        if item is None:
            continue
        item_r = Path(item).resolve()
        if item_r == out_r or out_r in item_r.parents:
            raise FastDreamError(f"{option} {out} holds the input {item}; fastdream will not write its outputs (or, with "
                                 f"--force, delete any) there. Choose an {option} folder outside the input.")


def is_nonempty(folder: Path) -> bool:
    return Path(folder).is_dir() and any(Path(folder).iterdir())


def clear_outputs(folder: Path, names: Iterable[str]) -> None:
    """--force: remove the named outputs in folder (anything else there is left alone)."""
    folder = Path(folder)
    for name in names:
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def remove_if_created(folder: Path, existed_before: bool) -> None:
    """Undo a folder this command created (everything in it is the command's own) after it failed early."""
    if not existed_before and Path(folder).is_dir():
        shutil.rmtree(folder, ignore_errors=True)
