"""End to end: wall time of `fastdream run` for N steps, projected to minutes per 10,000 steps.

    python -m benchmarks.bench_e2e [--device cpu|cuda] [--quick] [--json OUT] [--steps N]
                                   [--model ID_OR_DIR | --guidance reference] [--set KEY=VALUE ...]

Runs ``fastdream.cli.main(["run", PROMPT, "--out", TMP, "--steps", N, ...])`` in-process per ops
backend (fastdream.ops.use_backend("native" / "torch")) and reads the run's metrics.json: the training-loop time
(``train_time_s``, occupancy updates, previews and checkpoints included; model loading and the final
mesh/video export excluded) gives seconds per step, projected to minutes per 10,000 steps (DreamFusion's
default run length); ``wall_time_s`` (everything) is reported too. With ``--model`` the named
diffusion model is used (SD 2.1-base by default on CUDA, downloads on first use); otherwise, and in
--quick, ``--guidance reference`` against the demo scene (no model: measures the engine alone).
Mesh and video export are off unless --export is given. Short runs include warm-up steps, so the
projection is an upper bound; use more --steps for a tighter one.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from . import common  # noqa: E402

PROMPT = "a DSLR photo of a hamburger"


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 200 on CUDA, 10 on the CPU, 3 quick)")
    p.add_argument("--model", default=None, help="diffusion model (hub id or folder); default: --guidance reference")
    p.add_argument("--guidance", default=None, choices=("sd", "if", "reference"),
                   help="guidance kind (default: sd when --model is given, else reference)")
    p.add_argument("--backends", default=None, help="ops backends among native,torch (default: both on CUDA; CPU: native, the reference being minutes per step there)")
    p.add_argument("--export", action="store_true", help="also export the mesh and video (counted in wall_time_s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides for the run")
    return p


def run(args) -> Dict:
    started = time.perf_counter()
    device = common.resolve_device(args.device)
    dev = common.device_type(device)
    quick = bool(args.quick)
    from fastdream import cli
    from fastdream.demo import save_demo_scene

    steps = args.steps or (3 if quick else (200 if dev == "cuda" else 10))
    kind = args.guidance or ("sd" if args.model else "reference")
    status = common.available_backends(device)
    default = "native,torch" if dev == "cuda" else "native"
    if quick:  # one run: the faster backend present
        default = "native" if status.get("native") is None else "torch"
    backends = [b for b in (args.backends or default).split(",") if b]
    overrides: List[str] = []
    if not args.export:
        overrides += ["output.mesh=false", "output.video=false"]
    # the end-of-run preview is outside the timed loop: keep it small so the suite stays bounded
    overrides += ["output.preview_every=0", "output.checkpoint_every=0", "output.preview_views=1",
                  "output.preview_resolution=32"]
    if quick:
        overrides += ["width=16", "height=16", "field.log2_hashmap_size=14", "field.n_levels=8", "grid.resolution=16",
                      "render.samples_per_ray=64",
                      "grid.warmup_steps=1"]
    overrides += list(args.set or [])
    results, notes = [], []
    with tempfile.TemporaryDirectory(prefix="fastdream-bench-e2e-") as tmp:
        scene = save_demo_scene(Path(tmp) / "scene.npz", resolution=32 if quick else 64)
        for backend in backends:
            if status.get(backend) is not None:
                results.append(common.result_entry("run_per_step", backend, steps, "steps",
                                                   skipped=f"ops backend unavailable: {status[backend]}"))
                continue
            out = Path(tmp) / f"run-{backend}"
            argv = ["run", PROMPT, "--out", str(out), "--steps", str(steps), "--device", device, "--force",
                    "--quiet", "--guidance", kind]
            if kind == "reference":
                argv += ["--reference-scene", str(scene)]
            if args.model:
                argv += ["--model", args.model]
            for o in overrides:
                argv += ["--set", o]
            t0 = time.perf_counter()
            with common.backend_env(backend):
                try:
                    rc = cli.main(argv)
                except SystemExit as exc:  # argparse errors
                    rc = exc.code
                except Exception as exc:
                    rc, notes = 1, notes + [f"{backend}: {type(exc).__name__}: {exc}"[:300]]
            wall = time.perf_counter() - t0
            metrics_path = out / "metrics.json"
            if rc != 0 or not metrics_path.is_file():
                results.append(common.result_entry("run_per_step", backend, steps, "steps",
                                                   skipped=f"fastdream run exited with {rc} (see the log above)"))
                continue
            m = json.loads(metrics_path.read_text())
            train_s = float(m.get("train_time_s") or wall)
            per_step_ms = 1e3 * train_s / max(int(m.get("steps_this_session") or steps), 1)
            timing = common.summarize([per_step_ms])
            results.append(common.result_entry(
                "run_per_step", backend, steps, "steps", timing, work=1, work_unit="steps",
                minutes_per_10k_steps=per_step_ms * 10000 / 6e4, train_time_s=train_s,
                wall_time_s=float(m.get("wall_time_s") or wall), harness_wall_s=wall, it_per_s=m.get("it_per_s"),
                peak_memory=({k: v for k, v in m.items() if "memory" in k or "mem" in k} or None),
                guidance=m.get("guidance"), run_device=m.get("device")))
            r = results[-1]
            r["peak_memory_mb"] = next((float(v) for k, v in m.items() if "peak" in k and isinstance(v, (int, float))), None)
    ratios = [common.ratio("fastdream run per step: native vs reference ops", results, "run_per_step", "native", "torch")]
    config = {"steps": steps, "guidance": kind, "model": args.model, "overrides": overrides, "prompt": PROMPT,
              "backends": backends, "backend_status": status,
              "projection": "minutes per 10k steps = train_time_s / steps * 10000 / 60 (model load and export excluded)"}
    if quick:
        notes.append("quick mode: 16x16 renders, 3 steps, reference guidance: a plumbing test, not a speed figure")
    return common.make_result("e2e", args, config, results, ratios, [], started, notes)


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.finish(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
