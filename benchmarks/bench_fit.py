"""Fitting a real capture: occupancy over time, seconds per step and held-out PSNR of `fastdream fit`.

    python -m benchmarks.bench_fit [DATA_DIR] [--steps N] [--resolution W] [--rays R] [--seed S] [--json OUT]

DATA_DIR defaults to instant-ngp's fox (``data/nerf/fox`` of NVlabs/instant-ngp: COLMAP poses,
``aabb_scale`` 4), looked for in $FASTDREAM_FOX or /work/data/nerf/fox; when it is absent the benchmark
says so and writes a result without measurements (it is never downloaded). Frames whose image file is missing are left out
(some copies of the fox list more frames than they ship images). Runs fastdream.fit.fit with the
`fastdream fit` defaults and records, at every occupancy-grid update, the occupied fraction and the
wall time, then the held-out PSNR (every 8th frame), seconds per step, the machine and its load.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from . import common  # noqa: E402

DEFAULT_DATA = ("FASTDREAM_FOX", "/work/data/nerf/fox")
PSNR_TARGET_DB = 20.0
WALL_TARGET_S = 20 * 60


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", default=None, help="dataset folder (default: the fox, see the module docstring)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 3000; --quick 60)")
    p.add_argument("--resolution", type=int, default=135, help="image width to fit at (default 135)")
    p.add_argument("--rays", type=int, default=None, help="rays per step (default: fit's)")
    p.add_argument("--max-images", type=int, default=None, help="use only the first N frames (quick experiments)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="the fit's seed (rays drawn, initialisation; default 0)")
    return p


def _existing_frames(data_dir: Path, tmp: Path, max_images) -> Path:
    """A transforms.json naming only frames whose images exist (absolute paths), in tmp."""
    meta = json.loads((data_dir / "transforms.json").read_text())
    frames = [dict(f, file_path=str((data_dir / f["file_path"]).resolve())) for f in meta["frames"]
              if (data_dir / f["file_path"]).is_file()]
    meta["frames"] = frames[:max_images] if max_images else frames
    (tmp / "transforms.json").write_text(json.dumps(meta))
    return tmp


def run(args) -> Dict:
    started = time.perf_counter()
    import torch
    from fastdream.data import load_dataset
    from fastdream.fit import default_configs, fit, grid_update_due, near_gradient_distance

    data_dir = Path(args.data or os.environ.get(DEFAULT_DATA[0]) or DEFAULT_DATA[1])
    if not (data_dir / "transforms.json").is_file():
        # a result that says so, not an exit: the suite (`python -m benchmarks`) runs this script too
        message = (f"bench_fit: skipped: no dataset at {data_dir} (give DATA_DIR, or set {DEFAULT_DATA[0]} to "
                   "a folder holding instant-ngp's data/nerf/fox).")
        print(message, flush=True)
        targets = [common.target("fox: held-out PSNR >= 20 dB within 20 minutes (train + eval) on this machine, dB",
                                 "held-out PSNR after 3,000 steps", None, PSNR_TARGET_DB, applies=False,
                                 note="no dataset", unit="dB")]
        return common.make_result("fit", args, {"data": str(data_dir)}, [], targets=targets, started=started,
                                  notes=[message])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    steps = args.steps or (60 if args.quick else 3000)
    field_config, render_config, config = default_configs(steps)
    if args.rays:
        config.rays_per_step = args.rays
    config.seed = args.seed
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        train, test = load_dataset(_existing_frames(data_dir, Path(tmp), args.max_images), resolution=args.resolution)
        trace = []
        t0 = time.perf_counter()

        def on_step(step, renderer, loss):
            if grid_update_due(step, config):
                grid = renderer.grid
                extra = {"visible": round(float(grid.visible.float().mean()), 5)} if step == 1 else {}
                trace.append({**extra, "step": step, "seconds": round(time.perf_counter() - t0, 2),
                              "occupied": round(renderer.grid.occupied_fraction(), 5), "loss": round(loss, 6)})

        metrics = fit(train, test, Path(tmp) / "out", field_config, render_config, config, device=device,
                      progress=not args.quick, on_step=on_step)
        visible = trace[0]["visible"] if trace else None
        gradient_distance = near_gradient_distance(train, config)
    after_warmup = [r["occupied"] for r in trace if r["step"] >= config.grid_warmup_steps]
    s_per_step = metrics["train_seconds"] / steps
    wall = metrics["train_seconds"] + metrics["eval_seconds"]
    result = common.result_entry(
        "fit_per_step", metrics["backend"], steps, "steps", common.summarize([1e3 * s_per_step]), work=1,
        work_unit="steps", dataset=str(data_dir), n_train=metrics["n_train"], n_test=metrics["n_test"],
        resolution=metrics["resolution"], seconds_per_step=s_per_step, train_seconds=metrics["train_seconds"],
        eval_seconds=metrics["eval_seconds"], wall_seconds=wall, psnr_test=metrics["psnr"],
        psnr_test_per_view=metrics["psnr_per_view"],
        psnr_train_last=metrics["final_train_psnr"], mean_rays_per_step=metrics["mean_rays_per_step"],
        mean_samples_per_step=metrics["mean_samples_per_step"],
        occupied_after_warmup=after_warmup[0] if after_warmup else None, occupied_final=metrics["occupied_fraction"],
        visible_fraction=visible, occupancy_trace=trace, load_average_start=list(load_start),
        load_average_end=list(os.getloadavg()))
    targets = [common.target("fox: held-out PSNR >= 20 dB within 20 minutes (train + eval) on this machine, dB",
                             "held-out PSNR after 3,000 steps", metrics["psnr"], PSNR_TARGET_DB,
                             applies=steps >= 3000 and wall <= WALL_TARGET_S,
                             note=None if steps >= 3000 else f"only {steps} steps run", unit="dB")]
    config_out = {"steps": steps, "resolution": args.resolution, "rays_per_step": config.rays_per_step,
                  "samples_per_step": config.samples_per_step, "grid_update_ramp": config.grid_update_ramp,
                  "grid_reference_steps": config.grid_reference_steps, "n_levels": field_config.n_levels,
                  "log2_hashmap_size": field_config.log2_hashmap_size, "max_resolution": field_config.max_resolution,
                  "grid_resolution": config.grid_resolution, "grid_update_every": config.grid_update_every,
                  "grid_warmup_steps": config.grid_warmup_steps, "grid_ema_decay": config.grid_ema_decay,
                  "samples_per_ray": render_config.samples_per_ray, "near": render_config.near,
                  "random_background": config.random_background, "distortion_weight": config.distortion_weight,
                  "near_gradient_fraction": config.near_gradient_fraction, "near_gradient_distance": gradient_distance,
                  "seed": config.seed, "max_images": args.max_images}
    return common.make_result("fit", args, config_out, [result], targets=targets, started=started)


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.finish(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
