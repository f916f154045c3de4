"""Checks a GPU install in one command and writes one JSON report.

    python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check.json] [--quick] [--skip-build]

On a CUDA machine, in order:
  build       the extension for the local GPU's arch (FASTDREAM_BUILD_CUDA=1, setup.py build_ext --inplace)
  tests       the CUDA tests (pytest -m cuda) against the CPU ops and the PyTorch reference
  step tests  whole training steps replayed from CUDA graphs against eager ones (tests/test_step_capture.py)
  memcheck    the same tests under `compute-sanitizer --tool memcheck` (out-of-bounds and misaligned
  racecheck   accesses; shared-memory races), when compute-sanitizer is on PATH or in CUDA_HOME/bin
  benchmarks  bench_ops on CUDA, with tinycudann and nerfacc as peers when they are installed
  overhead    bench_overhead on CUDA: ops, host syncs and ms per training step, eager and from CUDA graphs
The report holds the device, the versions, each step's command, exit code, time and output tail, and
the benchmark results. Exit status 0 when every step passed; without a CUDA GPU it says so and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_GPU_EXIT = 2
CUDA_TESTS = ["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_native_ops.py"]
# whole training steps (eager against CUDA-graph replays): run once, not under the sanitizers
STEP_TESTS = ["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_step_capture.py"]


def find_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "compute-sanitizer"
    return str(candidate) if candidate.exists() else None


def plan(arch: str, sanitizer, bench_json: str, quick: bool, build: bool = True):
    """The steps as (name, command, extra environment)."""
    py = sys.executable
    steps = []
    if build:
        steps.append(("build", [py, "setup.py", "-q", "build_ext", "--inplace"],
                      {"FASTDREAM_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch}))
    env = {"FASTDREAM_REQUIRE_NATIVE": "1"}
    steps.append(("tests", [py, *CUDA_TESTS], env))
    steps.append(("step tests", [py, *STEP_TESTS], env))
    if sanitizer:
        for tool in ("memcheck", "racecheck"):
            steps.append((tool, [sanitizer, "--tool", tool, "--error-exitcode", "1", py, *CUDA_TESTS], env))
    bench = [py, "-m", "benchmarks.bench_ops", "--device", "cuda", "--json", bench_json]
    steps.append(("benchmarks", bench + (["--quick"] if quick else []), {}))
    # ops and host syncs per training step, and its ms per step eager and replayed from CUDA graphs
    overhead = str(Path(bench_json).with_name("overhead_cuda.json"))
    steps.append(("overhead", [py, "-m", "benchmarks.bench_overhead", "--device", "cuda", "--quick", "--json", overhead], {}))
    return steps


def run_step(name, cmd, extra_env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **extra_env}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(f"gpu_check: {name}: exit {proc.returncode} in {seconds:.0f} s", flush=True)
    return {"name": name, "command": " ".join(cmd), "exit_code": proc.returncode, "seconds": round(seconds, 1),
            "output_tail": (proc.stdout + proc.stderr)[-4000:]}


def write(report, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: report written to {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--quick", action="store_true", help="smaller benchmark sizes")
    p.add_argument("--skip-build", action="store_true", help="use the extension already built")
    args = p.parse_args(argv)
    import torch

    report = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if not torch.version.cuda else "no CUDA device is visible"
        print(f"gpu_check: no CUDA GPU on this machine ({why}); nothing was checked.", file=sys.stderr)
        write({**report, "gpu": None, "ok": False, "error": f"no CUDA GPU ({why})", "steps": []}, Path(args.out))
        return NO_GPU_EXIT
    major, minor = torch.cuda.get_device_capability()
    report["gpu"] = {"name": torch.cuda.get_device_name(), "capability": f"{major}.{minor}"}
    sanitizer = find_sanitizer()
    report["compute_sanitizer"] = sanitizer
    with tempfile.TemporaryDirectory() as tmp:
        bench_json = str(Path(tmp) / "ops_cuda.json")
        steps = [run_step(*s) for s in plan(f"{major}.{minor}", sanitizer, bench_json, args.quick, not args.skip_build)]
        report["steps"] = steps
        report["benchmarks"] = json.loads(Path(bench_json).read_text()) if os.path.exists(bench_json) else None
        overhead_json = Path(bench_json).with_name("overhead_cuda.json")
        report["overhead"] = json.loads(overhead_json.read_text()) if overhead_json.exists() else None
    report["ok"] = all(s["exit_code"] == 0 for s in steps)
    write(report, Path(args.out))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
