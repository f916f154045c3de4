"""Environment report for `fastdream.info()` / `fastdream doctor`: backend, compiled CUDA archs,
torch/CUDA versions, GPU, and which optional accelerators are installed (found with
importlib.util.find_spec; nothing optional is imported)."""
from __future__ import annotations

import importlib.util
import platform
from typing import Any, Dict

OPTIONAL = ("xformers", "tinycudann", "nerfacc", "open_clip", "ray")


def _found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def collect_info() -> Dict[str, Any]:
    from . import _backend
    from ._version import __version__

    info: Dict[str, Any] = {"fastdream": __version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch
    except Exception as exc:  # pragma: no cover - torch is a hard dependency
        info["torch"] = None
        info["error"] = f"torch is not importable: {exc}"
        return info
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    cuda_ok = bool(torch.cuda.is_available())
    info["cuda_available"] = cuda_ok
    info["gpu"] = torch.cuda.get_device_name(0) if cuda_ok else None
    info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda_ok else None
    info["requested_backend"] = _backend.requested_backend()
    module = _backend.extension()
    native: Dict[str, Any] = {"built": module is not None}
    if module is None:
        native["error"] = str(_backend.extension_error())
    else:
        native["devices"] = list(module.compiled_devices())
        native["cuda_archs"] = list(getattr(module, "cuda_archs", lambda: [])())
        native["cuda_version"] = getattr(module, "cuda_version", lambda: "")() or None
        native["openmp"] = bool(getattr(module, "has_openmp", lambda: False)())
        native["path"] = getattr(module, "__file__", None)
    info["native"] = native
    try:
        info["backend"] = {"cpu": _backend.backend_name("cpu")}
        if cuda_ok:
            info["backend"]["cuda"] = _backend.backend_name("cuda")
    except Exception as exc:  # the native backend chosen without the extension
        info["backend"] = {"error": str(exc)}
    info["optional"] = {name: _found(name) for name in OPTIONAL}
    return info


def format_info(info: Dict[str, Any]) -> str:
    lines = [f"fastdream {info.get('fastdream')}  (python {info.get('python')}, {info.get('platform')})"]
    if info.get("torch") is None:
        lines.append(f"torch: missing ({info.get('error')})")
        return "\n".join(lines)
    lines.append(f"torch {info['torch']}  CUDA runtime: {info.get('torch_cuda') or 'none (CPU build)'}")
    if info.get("gpu"):
        lines.append(f"GPU: {info['gpu']} (sm {info.get('gpu_capability')})")
    else:
        lines.append("GPU: none visible")
    native = info.get("native", {})
    if native.get("built"):
        archs = ", ".join(native.get("cuda_archs") or []) or "-"
        lines.append(f"native extension: built for {', '.join(native.get('devices', []))}; CUDA archs: {archs}"
                     f"{'; CUDA ' + native['cuda_version'] if native.get('cuda_version') else ''}"
                     f"; OpenMP: {'yes' if native.get('openmp') else 'no'}")
    else:
        lines.append(f"native extension: not available ({native.get('error')}); the PyTorch reference ops are used")
    backend = info.get("backend", {})
    if "error" in backend:
        lines.append(f"backend: error: {backend['error']}")
    else:
        lines.append("backend in use: " + ", ".join(f"{dev}={name}" for dev, name in backend.items())
                     + f"  (backend chosen: {info.get('requested_backend')})")
    opt = info.get("optional", {})
    lines.append("optional accelerators: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in opt.items()))
    return "\n".join(lines)
