"""Builds the emulated-CUDA library: csrc/cuda/*.cu (kernels and launchers, unmodified) translated by
translate.py and compiled as host C++ with shim/emulated_cuda.h force-included. Loading it registers
the CUDA launchers as `torch.ops.<namespace>.*`, which take CPU tensors."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from .translate import translate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # unchanged files keep ninja's cache
        path.write_text(text)


def build(build_dir: Path, namespace: str = "fastdream_cudaemu", only: Optional[list[str]] = None,
          patch: Optional[Callable[[str, str], str]] = None, extra_cflags: tuple[str, ...] = (),
          verbose: bool = False) -> str:
    """Compile and load the library; returns its path. only: .cu file names to include (default all);
    patch(name, text) -> text edits a source before translation (the harness's own planted-bug test)."""
    from torch.utils import cpp_extension

    gen = Path(build_dir) / "gen"
    gen.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in CUDA_SOURCES:
        if only is not None and cu.name not in only:
            continue
        text = cu.read_text()
        if patch is not None:
            text = patch(cu.name, text)
        host, _ = translate(text, str(cu))
        out = gen / f"{cu.stem}.cpp"
        _write_if_changed(out, host)
        sources.append(str(out))
    sources.append(str(HERE / "launch_stats.cpp"))
    flags = ["-O1", "-g0", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
             f"-DCUDAEMU_NAMESPACE={namespace}", "-include", str(HERE / "shim" / "emulated_cuda.h"),
             *extra_cflags]
    return cpp_extension.load(
        name=f"{namespace}_lib", sources=sources, extra_cflags=flags,
        extra_include_paths=[str(HERE / "shim"), str(ROOT / "csrc" / "include"), str(ROOT / "csrc"),
                             str(ROOT / "csrc" / "cuda")],
        build_directory=str(build_dir), is_python_module=False, verbose=verbose)
