"""Shared helpers of the benchmark scripts: environment record, timing, peak memory, result JSON.

Every benchmark script exposes ``build_parser()`` (start from ``base_parser``: --device --quick
--json --repeats --warmup) and ``run(args) -> dict``, the dict built with ``make_result`` so that it
validates against ``benchmarks/schema.json``:

    {"schema_version": 1, "benchmark": "render", "device": "cpu", "quick": false,
     "env": {...environment()...}, "config": {...},
     "results": [{"name", "backend", "size", "size_unit", "median_ms", "spread": {...}, "throughput", ...}],
     "ratios": [{"name", "numerator", "denominator", "value"}],
     "targets": [{"name", "description", "threshold", "value", "met"}],  # met: true / false / null
     "created": "...", "wall_s": 12.3}

Timing: ``time_fn(fn)`` runs warm-up calls, then N timed repeats; on CUDA each repeat is bracketed
by CUDA events after a synchronize, on the CPU by perf_counter. It reports the median and the
spread (IQR, min, max) in milliseconds and the peak memory of the timed calls
(torch.cuda.max_memory_allocated on CUDA; on the CPU the peak resident-set growth over the
pre-call level, sampled from /proc/self/statm every millisecond, else ru_maxrss).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

SCHEMA_VERSION = 1
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SCHEMA_PATH = BENCH_DIR / "schema.json"


# ---------------------------------------------------------------------------------------------- CLI
def resolve_device(device: Optional[str] = None) -> str:
    """'auto'/None -> 'cuda' when available else 'cpu'; otherwise the given string ('cuda:1' kept)."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available in this torch build / machine.")
    return str(device)


def device_type(device: str) -> str:
    return str(device).split(":")[0]


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: seconds on a CPU (tests)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the result JSON here")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default per mode)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per measurement")
    return p


def repeats_for(args, full: int, quick: int = 3) -> int:
    r = getattr(args, "repeats", None)
    return max(1, int(r)) if r else (quick if getattr(args, "quick", False) else full)


def warmup_for(args, full: int = 2, quick: int = 1) -> int:
    w = getattr(args, "warmup", None)
    return max(0, int(w)) if w is not None else (quick if getattr(args, "quick", False) else full)


# ---------------------------------------------------------------------------------------------- environment
def _run(cmd: Sequence[str], cwd=None, timeout: float = 10.0) -> Optional[str]:
    try:
        out = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version(name)
    except Exception:
        return None


def git_info() -> Dict[str, Any]:
    commit = _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return {"commit": commit, "dirty": (bool(status) if status is not None else None)}


def fastdream_backend_info(device: str = "cpu") -> Dict[str, Any]:
    """Which ops backend fastdream uses on this device, and what the extension was built with."""
    info: Dict[str, Any] = {"requested": None, "active": None, "extension": None, "extension_error": None}
    try:
        from fastdream import _backend

        info["requested"] = _backend.requested_backend()
        info["active"] = _backend.backend_name(device_type(device))
        module = _backend.extension()
        if module is not None:
            ext = {}
            for attr in ("compiled_devices", "cuda_archs", "cuda_version", "has_openmp"):
                value = getattr(module, attr, None)
                try:
                    value = value() if callable(value) else value
                except Exception as exc:  # pragma: no cover
                    value = f"error: {exc}"
                ext[attr] = list(value) if isinstance(value, (tuple, set)) else value
            info["extension"] = ext
        else:
            info["extension_error"] = str(_backend.extension_error())
    except Exception as exc:
        info["extension_error"] = f"{type(exc).__name__}: {exc}"
    return info


def environment(device: str = "cpu") -> Dict[str, Any]:
    """Where the numbers come from: device, versions, backend, commit, CPU count."""
    import torch

    dev = device_type(device)
    env: Dict[str, Any] = {
        "device": str(device),
        "device_name": _cpu_name(),
        "cpu_name": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": (list(os.getloadavg()) if hasattr(os, "getloadavg") else None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": (torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None),
        "driver": None,
        "gpu_memory_gb": None,
        "compute_capability": None,
        "fastdream": _package_version("fastdream"),
        "backend": fastdream_backend_info(device),
        "git": git_info(),
        "packages": {name: _package_version(name) for name in
                     ("numpy", "diffusers", "transformers", "xformers", "tinycudann", "nerfacc", "triton")},
    }
    if dev == "cuda" and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        env["device_name"] = props.name
        env["gpu_memory_gb"] = round(props.total_memory / 2**30, 2)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        smi = _run(["nvidia-smi", f"--id={index}", "--query-gpu=driver_version,name", "--format=csv,noheader"])
        if smi:
            env["driver"] = smi.split(",")[0].strip()
        else:
            env["driver"] = None
            env["driver_note"] = "nvidia-smi not available; device from torch.cuda.get_device_properties"
    return env


# ---------------------------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if device_type(device) == "cuda":
        import torch

        torch.cuda.synchronize(torch.device(device))


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Context manager measuring peak memory of a block: CUDA max_memory_allocated (bytes above the
    allocation at entry is in ``delta_mb``; absolute peak in ``peak_mb``), or CPU resident-set growth."""

    def __init__(self, device: str, interval_s: float = 0.001):
        self.device, self.interval_s = device, interval_s
        self.peak_mb: Optional[float] = None
        self.delta_mb: Optional[float] = None
        self.kind: Optional[str] = None

    def __enter__(self):
        import torch

        if device_type(self.device) == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
            return self
        self._start = _rss_bytes()
        if self._start is None:
            self.kind = "ru_maxrss"
            return self
        self.kind = "cpu_rss_peak"
        self._peak = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                rss = _rss_bytes()
                if rss is not None and rss > self._peak:
                    self._peak = rss
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_mb, self.delta_mb = peak / 2**20, max(peak - self._start, 0) / 2**20
        elif self.kind == "cpu_rss_peak":
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes() or 0
            self._peak = max(self._peak, rss)
            self.peak_mb, self.delta_mb = self._peak / 2**20, (self._peak - self._start) / 2**20
        else:
            maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_mb = maxrss_kb / 1024.0
        return False


def _quantile(sorted_values: List[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Dict[str, Any]:
    """median and spread (IQR / min / max / mean / stdev) of repeat times in ms."""
    values = sorted(float(t) for t in times_ms)
    q1, q3 = _quantile(values, 0.25), _quantile(values, 0.75)
    return {
        "median_ms": statistics.median(values),
        "spread": {
            "iqr_ms": q3 - q1, "q1_ms": q1, "q3_ms": q3, "min_ms": values[0], "max_ms": values[-1],
            "mean_ms": statistics.fmean(values), "stdev_ms": statistics.stdev(values) if len(values) > 1 else 0.0,
            "repeats": len(values),
        },
    }


def time_fn(fn: Callable[[], Any], device: str = "cpu", warmup: int = 2, repeats: int = 10,
            setup: Optional[Callable[[], Any]] = None, measure_memory: bool = True,
            max_seconds: Optional[float] = None) -> Dict[str, Any]:
    """Warm up, then time ``repeats`` calls of fn (``setup`` runs untimed before each call).

    Returns summarize()'s dict plus ``peak_memory_mb`` / ``memory_delta_mb`` / ``memory_kind`` and
    ``times_ms``. ``max_seconds`` stops the repeats early (at least one) when the budget is spent.
    """
    import torch

    cuda = device_type(device) == "cuda"
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times: List[float] = []
    mem = PeakMemory(device) if measure_memory else contextlib.nullcontext()
    start_all = time.perf_counter()
    with mem:
        for _ in range(max(1, repeats)):
            if setup is not None:
                setup()
            if cuda:
                synchronize(device)
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            if max_seconds is not None and time.perf_counter() - start_all > max_seconds:
                break
    out = summarize(times)
    out["times_ms"] = [round(t, 4) for t in times]
    if measure_memory:
        out["peak_memory_mb"] = mem.peak_mb
        out["memory_delta_mb"] = mem.delta_mb
        out["memory_kind"] = mem.kind
    return out


# ---------------------------------------------------------------------------------------------- results
def result_entry(name: str, backend: str, size: Optional[float] = None, size_unit: Optional[str] = None,
                 timing: Optional[Dict[str, Any]] = None, work: Optional[float] = None,
                 work_unit: Optional[str] = None, skipped: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
    """One row of results. ``work`` items per call (points, rays, images...) give ``throughput``
    = work per second from the median; ``skipped`` (a reason) marks a measurement that could not run."""
    entry: Dict[str, Any] = {"name": name, "backend": backend, "size": size, "size_unit": size_unit,
                             "median_ms": None, "spread": None, "throughput": None,
                             "throughput_unit": (f"{work_unit}/s" if work_unit else None),
                             "peak_memory_mb": None, "memory_kind": None, "skipped": skipped}
    if timing is not None:
        entry["median_ms"] = timing["median_ms"]
        entry["spread"] = timing["spread"]
        entry["peak_memory_mb"] = timing.get("peak_memory_mb")
        entry["memory_delta_mb"] = timing.get("memory_delta_mb")
        entry["memory_kind"] = timing.get("memory_kind")
        entry["times_ms"] = timing.get("times_ms")
        if work is not None and timing["median_ms"] > 0:
            entry["throughput"] = float(work) / (timing["median_ms"] / 1e3)
    if extra:
        entry["extra"] = extra
    return entry


def find_result(results: Iterable[Dict[str, Any]], name: str, backend: str, size=None) -> Optional[Dict[str, Any]]:
    for r in results:
        if r.get("name") == name and r.get("backend") == backend and (size is None or r.get("size") == size) \
                and r.get("median_ms") is not None:
            return r
    return None


def ratio(name: str, results: Sequence[Dict[str, Any]], metric: str, faster: str, slower: str,
          size=None, description: str = "") -> Dict[str, Any]:
    """Speed-up of backend ``faster`` over ``slower`` on measurement ``metric`` (slower ms / faster ms);
    value null when either side was not measured."""
    a, b = find_result(results, metric, faster, size), find_result(results, metric, slower, size)
    value = (b["median_ms"] / a["median_ms"]) if (a and b and a["median_ms"] > 0) else None
    return {"name": name, "metric": metric, "numerator": faster, "denominator": slower, "size": size,
            "value": value, "description": description or f"{metric}: {slower} ms / {faster} ms"}


def target(name: str, description: str, value: Optional[float], threshold: float, op: str = ">=",
           applies: bool = True, note: Optional[str] = None, unit: Optional[str] = None) -> Dict[str, Any]:
    """A target from the issues: met is true/false when measured on a device it applies to, else null."""
    met: Optional[bool] = None
    if applies and value is not None and not (isinstance(value, float) and math.isnan(value)):
        met = bool(value >= threshold) if op == ">=" else bool(value <= threshold)
    if note is None and met is None:
        note = "not applicable on this device" if not applies else "not measured (a side is missing)"
    return {"name": name, "description": description, "op": op, "threshold": threshold, "value": value,
            "unit": unit, "applies": applies, "met": met, "note": note}


def make_result(benchmark: str, args, config: Dict[str, Any], results: List[Dict[str, Any]],
                ratios: Optional[List[Dict[str, Any]]] = None, targets: Optional[List[Dict[str, Any]]] = None,
                started: Optional[float] = None, notes: Optional[List[str]] = None) -> Dict[str, Any]:
    device = resolve_device(getattr(args, "device", None))
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": benchmark,
        "device": device,
        "quick": bool(getattr(args, "quick", False)),
        "env": environment(device),
        "config": config,
        "results": results,
        "ratios": ratios or [],
        "targets": targets or [],
        "notes": notes or [],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": (time.perf_counter() - started) if started is not None else None,
    }


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _finite(obj):
    """NaN/inf are not JSON: write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(data: Dict[str, Any], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_finite(data), f, indent=1, default=_json_default, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_schema() -> Dict[str, Any]:
    with open(SCHEMA_PATH) as f:
        return json.load(f)


def validate(data: Dict[str, Any]) -> List[str]:
    """Schema errors of a result dict (empty list: valid). Needs jsonschema; raises ImportError without it."""
    import jsonschema

    validator = jsonschema.Draft7Validator(load_schema())
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(_finite(json.loads(json.dumps(data, default=_json_default)))),
                            key=lambda e: list(map(str, e.absolute_path)))]


def result_path(out_dir, benchmark: str, device: str) -> Path:
    return Path(out_dir) / f"{benchmark}_{device_type(device)}.json"


def print_summary(data: Dict[str, Any], file=None) -> None:
    """A short human-readable table of one result dict."""
    file = file or sys.stdout
    print(f"== {data['benchmark']} on {data['env'].get('device_name')} ({data['device']}, "
          f"backend {data['env'].get('backend', {}).get('active')}){' [quick]' if data.get('quick') else ''}", file=file)
    for r in data["results"]:
        size = "" if r.get("size") is None else f"{r['size']:g} {r.get('size_unit') or ''}".strip()
        if r.get("median_ms") is None:
            print(f"  {r['name']:<28} {r['backend']:<12} {size:<16} skipped: {r.get('skipped')}", file=file)
            continue
        sp = r.get("spread") or {}
        tp = f"  {r['throughput']:.4g} {r['throughput_unit']}" if r.get("throughput") else ""
        print(f"  {r['name']:<28} {r['backend']:<12} {size:<16} {r['median_ms']:10.3f} ms "
              f"(IQR {sp.get('iqr_ms', 0):.3f}, n={sp.get('repeats')}){tp}", file=file)
    for q in data.get("ratios", []):
        v = "n/a" if q.get("value") is None else f"{q['value']:.2f}x"
        print(f"  ratio {q['name']}: {v}", file=file)
    for t in data.get("targets", []):
        mark = {True: "MET", False: "MISSED", None: "n/a"}[t.get("met")]
        v = "n/a" if t.get("value") is None else f"{t['value']:.3g}"
        print(f"  target {t['name']} ({t['description']}): {v} {t['op']} {t['threshold']:g} -> {mark}", file=file)


def finish(data: Dict[str, Any], args) -> Dict[str, Any]:
    """Print the summary and write --json when given (scripts call this from their __main__)."""
    print_summary(data)
    if getattr(args, "json", None):
        print(f"wrote {write_json(data, args.json)}")
    return data


@contextlib.contextmanager
def backend_env(name: str):
    """Use fastdream's ops backend `name` inside the block (fastdream.ops.use_backend)."""
    from fastdream.ops import use_backend

    with use_backend(name):
        yield


def available_backends(device: str) -> Dict[str, Optional[str]]:
    """{'native': None or why-not, 'torch': None}: whether fastdream's native ops actually run on this
    device (the extension loads, is compiled for it, and a tiny hash encoding succeeds)."""
    import torch

    status: Dict[str, Optional[str]] = {"native": None, "torch": None}
    try:
        with backend_env("native"):
            from fastdream import _backend, ops

            if not _backend.use_native(device_type(device)):
                status["native"] = f"extension not compiled for {device_type(device)}"
            else:
                x = torch.rand(8, 3, device=device)
                p = torch.zeros(ops.hash_grid_n_params(n_levels=2, log2_hashmap_size=8), device=device)
                ops.hash_encode(x, p, n_levels=2, log2_hashmap_size=8)
    except Exception as exc:
        status["native"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return status
