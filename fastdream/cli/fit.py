"""`fastdream fit DATA_DIR --out OUT` / `fastdream fit --demo`: fit the field to posed images (see fastdream.fit)."""
from __future__ import annotations

import argparse
import logging

from ..fit import DEMO_PSNR_TARGET, fit_folder
from .options import integer, number

log = logging.getLogger("fastdream")


def run_fit(args) -> int:
    metrics = fit_folder(args.out, data=args.data, demo=args.demo, force=args.force, steps=args.steps,
                         resolution=args.resolution, rays=args.rays, background=args.background, seed=args.seed,
                         device=args.device, max_test_views=args.max_test_views, threads=args.threads,
                         near_gradient=args.near_gradient, progress=not args.no_progress)
    log.info("fastdream fit: held-out PSNR %.2f dB after %d steps in %.1f s; wrote %s/%s and %s/metrics.json",
             metrics["psnr"], metrics["steps"], metrics["seconds"], metrics["out"], metrics["checkpoint"], metrics["out"])
    if args.demo and metrics["psnr"] < DEMO_PSNR_TARGET:
        log.error("fastdream fit --demo: held-out PSNR %.2f dB is below the %.0f dB the demo always reaches; "
                  "the engine (or the native backend: try FASTDREAM_BACKEND=torch) is not working right.",
                  metrics["psnr"], DEMO_PSNR_TARGET)
        return 1
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fit", help="fit the field to posed images (NeRF-synthetic / instant-ngp format), or to a built-in demo scene",
        description="Fit the radiance field to posed images and report held-out PSNR. DATA_DIR holds transforms_train.json + "
                    "transforms_test.json, or a single transforms.json (every 8th frame is held out). --demo renders a "
                    "small synthetic scene and fits it offline on a CPU in about a minute.")
    parser.add_argument("data", nargs="?", metavar="DATA_DIR", help="dataset folder (or a transforms*.json file)")
    parser.add_argument("--demo", action="store_true", help="fit a built-in synthetic scene (written to OUT/demo_data)")
    parser.add_argument("--out", metavar="OUT", help="output folder (checkpoint, metrics.json, test views); default for --demo: ./fastdream-fit-demo")
    parser.add_argument("--force", action="store_true", help="reuse a non-empty --out: replaces its fit outputs (checkpoints, test_views, metrics.json, demo_data), leaves other files")
    parser.add_argument("--steps", type=integer(1), help="training steps (default: 2000, demo: 150)")
    parser.add_argument("--resolution", type=integer(1), metavar="W", help="downscale images to this width (keeps the aspect ratio)")
    parser.add_argument("--rays", type=integer(1), help="random rays per step (default: 4096, demo: 2048)")
    parser.add_argument("--background", default="white", help="colour RGBA images are composited over: white, black or r,g,b")
    parser.add_argument("--seed", type=integer(0), default=0)
    parser.add_argument("--near-gradient", type=number(0.0), metavar="FRACTION",
                        help="scale each sample's gradient by min(1, (t/d)^2), t its distance from the camera and d this "
                             "fraction of the cameras' mean distance to the scene, against haze in front of the cameras "
                             "(\"Floaters No More\"; default: 0.4 for DATA_DIR, off for --demo; 0: off)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--max-test-views", type=integer(1), help="evaluate on at most this many held-out views")
    parser.add_argument("--threads", type=integer(1), help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_fit)
    return parser
