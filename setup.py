"""Build of fastdream's optional native extension (fastdream._C).

Package metadata lives in pyproject.toml; this file only adds the extension:
  FASTDREAM_BUILD_NATIVE=0        build nothing native (pure-Python install; the PyTorch ops are used)
  FASTDREAM_BUILD_CUDA=auto|0|1   auto (default): CUDA kernels when torch has CUDA and a toolkit is found;
                                  1: fail loudly if CUDA cannot be built; 0: CPU kernels only
  TORCH_CUDA_ARCH_LIST            CUDA targets (default "7.5;8.0;8.6;8.9;9.0+PTX")
  MAX_JOBS                        parallel compile jobs (ninja)
Needs torch importable at build time: `pip install --no-build-isolation -e .` (see csrc/README.md).
If torch is not importable, nothing native is built and the install still succeeds.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _log(msg: str) -> None:
    print(f"[fastdream setup] {msg}", file=sys.stderr)


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _cuda_home():
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        # `nvcc` on PATH may be a wrapper script; prefer the canonical toolkit location when present.
        for candidate in ("/usr/local/cuda",):
            if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
                home = candidate
                break
    if not home:
        home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    return None


def native_extensions():
    """(ext_modules, cmdclass) for the current environment."""
    if _flag("FASTDREAM_BUILD_NATIVE", "1") in ("0", "false", "no", "off"):
        _log("FASTDREAM_BUILD_NATIVE=0: building no native extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # pragma: no cover - depends on the build environment
        _log(f"torch is not importable ({exc}); building no native extension (use --no-build-isolation)")
        return [], {}

    want_cuda = _flag("FASTDREAM_BUILD_CUDA", "auto")
    if want_cuda not in ("auto", "0", "1"):
        raise SystemExit(f"FASTDREAM_BUILD_CUDA must be auto, 0 or 1, got {want_cuda!r}")
    with_cuda = False
    if want_cuda != "0":
        cuda_home = _cuda_home() if torch.version.cuda else None
        if torch.version.cuda and cuda_home:
            os.environ["CUDA_HOME"] = cuda_home
            cpp_extension.CUDA_HOME = cuda_home  # cpp_extension caches its guess at import time
            with_cuda = True
        elif want_cuda == "1":
            why = "torch was built without CUDA" if not torch.version.cuda else "no CUDA toolkit found (set CUDA_HOME)"
            raise SystemExit(f"FASTDREAM_BUILD_CUDA=1 but CUDA cannot be built: {why}")
        else:
            _log("CUDA not available for the build (CPU torch or no toolkit): building the CPU kernels only")

    sources = [os.path.join("csrc", "ops.cpp"), os.path.join("csrc", "cpu", "ops_cpu.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    cxx = ["-O3", "-ffp-contract=off"]
    link = []
    if sys.platform != "win32":
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    define_macros = []
    archs = ""
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        if not archs:
            archs = DEFAULT_ARCHS  # torch's own detection needs a visible GPU (IndexError without one)
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        define_macros += [("FD_WITH_CUDA", None), ("FD_CUDA_ARCHS", f'"{archs}"')]
        nvcc = ["-O3", "--expt-relaxed-constexpr", "--extended-lambda", "-lineinfo", "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
        ext = cpp_extension.CUDAExtension(
            "fastdream._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
        _log(f"building CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} (CUDA_HOME={os.environ['CUDA_HOME']})")
    else:
        ext = cpp_extension.CppExtension(
            "fastdream._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=link)
        _log("building CPU kernels")
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
