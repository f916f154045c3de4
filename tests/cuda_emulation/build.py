"""Builds the emulated-CUDA library: csrc/cuda/*.cu (kernels and launchers, unmodified) translated by
translate.py and compiled as host C++ with shim/emulated_cuda.h force-included. The headers under csrc/
are translated too, into a mirror of csrc/ in the build folder that is the only csrc/ the compiler sees,
so a launch written in a header (the kernel of fastdream/parallel_for.h) runs through the emulation as
well. Loading the library registers the CUDA launchers as `torch.ops.<namespace>.*`, which take CPU
tensors."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from .translate import translate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
HEADERS = sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh"))


def launch_sites() -> dict[str, int]:
    """csrc-relative path -> number of CUDA launches written in it (.cu files and headers)."""
    sites = {}
    for path in CUDA_SOURCES + HEADERS:
        n = translate(path.read_text(), str(path))[1]
        if n:
            sites[path.relative_to(CSRC).as_posix()] = n
    return sites


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # unchanged files keep ninja's cache
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def build(build_dir: Path, namespace: str = "fastdream_cudaemu", only: Optional[list[str]] = None,
          patch: Optional[Callable[[str, str], str]] = None, extra_cflags: tuple[str, ...] = (),
          verbose: bool = False) -> str:
    """Compile and load the library; returns its path. only: .cu file names to include (default all);
    patch(name, text) -> text edits a .cu file or a csrc header (by file name) before translation (the
    harness's own planted-bug test)."""
    from torch.utils import cpp_extension

    mirror = Path(build_dir) / "gen" / "csrc"
    sources = []
    for path in CUDA_SOURCES + HEADERS:
        is_cu = path.suffix == ".cu"
        if is_cu and only is not None and path.name not in only:
            continue
        text = path.read_text()
        if patch is not None:
            text = patch(path.name, text)
        rel = path.relative_to(CSRC)
        host, _ = translate(text, str(path), site=rel.as_posix())
        out = mirror / (rel.with_suffix(".cpp") if is_cu else rel)
        _write_if_changed(out, host)
        if is_cu:
            sources.append(str(out))
    sources.append(str(HERE / "launch_stats.cpp"))
    flags = ["-O1", "-g0", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
             f"-DCUDAEMU_NAMESPACE={namespace}", "-include", str(HERE / "shim" / "emulated_cuda.h"),
             *extra_cflags]
    # Only the mirror: an #include can reach no untranslated csrc header.
    return cpp_extension.load(
        name=f"{namespace}_lib", sources=sources, extra_cflags=flags,
        extra_include_paths=[str(HERE / "shim"), str(mirror / "include"), str(mirror), str(mirror / "cuda")],
        build_directory=str(build_dir), is_python_module=False, verbose=verbose)
