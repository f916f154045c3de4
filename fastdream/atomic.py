"""Atomic file writes and disk-full errors, shared by checkpoints and every exported output.

A file is written under a temporary name in its own folder (``NAME.<random>.tmp<suffix>``, keeping the
suffix so writers that pick a format by extension still work), flushed to disk and renamed over the
target only once complete: a crash, a signal or a full disk leaves the previous version of the file in
place, never a truncated one. A full disk ("No space left on device", or a quota) becomes a
one-paragraph `FastDreamError` that names the file and says the earlier version was kept.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, Mapping, Sequence, Union

from .errors import FastDreamError

PathLike = Union[str, os.PathLike]

DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
# what temporary_path() names its files: "<name>.<8 random chars>.tmp<suffix>"
_TEMPORARY = re.compile(r"^.+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def disk_full_error(path: PathLike, exc: OSError, others: Sequence[PathLike] = ()) -> FastDreamError:
    paths = [Path(path), *(Path(p) for p in others)]
    what = str(paths[0]) if len(paths) == 1 else f"{', '.join(p.name for p in paths)} in {paths[0].parent}"
    earlier = (f"the earlier version of {paths[0].name}, if there was one, is" if len(paths) == 1
               else "the earlier versions of these files, if there were any, are")
    return FastDreamError(
        f"No space left on device while writing {what} ({exc.strerror or exc}). Nothing was half-written: {earlier} "
        "untouched. Free some space on that disk (older checkpoints can go: output.keep_checkpoints keeps fewer) or "
        "choose another --out, then run the command again (`fastdream run ... --resume` continues from the last "
        "checkpoint).")


@contextlib.contextmanager
def _replace_when_done(path: Path) -> Iterator[Path]:
    """A temporary path next to `path`, fsynced and renamed to `path` when the block succeeds, removed if not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def temporary_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it is fsynced and renamed to `path`.

    On any error (or signal) the temporary file is removed and `path` keeps its earlier content; a full
    disk is raised as a `FastDreamError`."""
    path = Path(path)
    try:
        with _replace_when_done(path) as tmp:
            yield tmp
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, exc) from None
        raise


@contextlib.contextmanager
def temporary_paths(paths: Mapping[str, PathLike]) -> Iterator[Dict[str, Path]]:
    """temporary_path for a group of files that belong together (mesh.obj/.mtl/.ply/.glb): all are
    renamed into place only once every one of them was written, so a failure leaves the old set whole."""
    targets = [Path(p) for p in paths.values()]
    try:
        with contextlib.ExitStack() as stack:
            # the ExitStack renames only after the block below succeeded for all of them
            yield {key: stack.enter_context(_replace_when_done(Path(p))) for key, p in paths.items()}
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(targets[0], exc, targets[1:]) from None
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs) -> Iterator:
    """open() for writing, atomically (see temporary_path)."""
    if "w" not in mode:
        raise ValueError(f"atomic_open replaces a whole file: use a 'w' mode, not {mode!r}")
    with temporary_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_text(path: PathLike, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def remove_stale_temporaries(folders: Iterable[PathLike]) -> int:
    """Delete temporary files a killed write left behind in these folders (not recursive); returns how many."""
    removed = 0
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_file() and _TEMPORARY.match(p.name):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed += 1
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
