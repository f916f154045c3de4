"""Peak memory per training step of `fastdream run` on the default configuration.

    python -m benchmarks.bench_memory [--device cpu|cuda] [--quick] [--json OUT] [--steps N]

Runs the real ``Trainer.train_step`` (default RunConfig: 64x64, batch 1, the DreamFusion blob, normals
for the orientation loss on every step) from the first step, with the tiny test UNet/VAE and with
reference guidance, and measures each step's peak memory: on CUDA ``torch.cuda.max_memory_allocated``
above the allocation at the step's start; on the CPU the growth of the resident set over its level at
the step's start, sampled every millisecond from /proc/self/statm (tracemalloc does not see torch's
allocations). Also recorded per step: samples marched and kept (the tensors that dominate the
activation memory) and the occupied fraction of the grid.
"""
from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from . import common  # noqa: E402


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="steps per guidance from step 0 (default 8; quick 2)")
    p.add_argument("--guidance", default="tiny-sd,reference", help="comma-separated among tiny-sd,reference")
    return p


def run(args) -> Dict:
    started = time.perf_counter()
    from .bench_overhead import build_trainer

    device = common.resolve_device(args.device)
    n = args.steps or (2 if args.quick else 8)
    results: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in [k for k in args.guidance.split(",") if k]:
            trainer = build_trainer(kind, device, Path(tmp))
            rows = []
            for step in range(n):
                with common.PeakMemory(device) as mem:
                    t0 = time.perf_counter()
                    info = trainer.train_step(step)
                    seconds = time.perf_counter() - t0
                # samples per ray is a device metric of the step (read here, after the measured step)
                per_ray = float(info["metrics"]["samples_per_ray"])
                n_rays = trainer.config.batch_size * trainer.config.width * trainer.config.height
                rows.append({"step": step, "peak_mb": mem.peak_mb, "delta_mb": mem.delta_mb, "seconds": round(seconds, 3),
                             "samples_per_ray": round(per_ray, 3), "n_samples": round(per_ray * n_rays),
                             "shading": info.get("shading"),
                             "occupied": round(trainer.renderer.grid.occupied_fraction(), 4)})
                print(f"  {kind} step {step}: +{mem.delta_mb:.0f} MB (peak {mem.peak_mb:.0f} MB), "
                      f"{rows[-1]['n_samples']} samples, {seconds:.2f} s", flush=True)
            worst = max(rows, key=lambda r: r["delta_mb"] or 0.0)
            results.append(common.result_entry(
                "step_peak_memory", f"native/{kind}", n, "steps", common.summarize([1e3 * r["seconds"] for r in rows]),
                work=1, work_unit="steps", guidance=kind, max_step_delta_mb=worst["delta_mb"],
                max_step_peak_mb=worst["peak_mb"], memory_kind=mem.kind, steps=rows,
                ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))
            results[-1]["peak_memory_mb"], results[-1]["memory_delta_mb"] = worst["peak_mb"], worst["delta_mb"]
            results[-1]["memory_kind"] = mem.kind
            del trainer
    config = {"render": "64x64 batch 1 (RunConfig defaults)", "steps": n, "guidance": args.guidance.split(","),
              "measure": "per step: peak above the step's starting level"}
    return common.make_result("memory", args, config, results, [], [], started,
                              ["CPU: resident-set growth within each step, sampled every millisecond"])


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.finish(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
