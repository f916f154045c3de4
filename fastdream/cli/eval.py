"""`fastdream eval RUN_DIRS... --prompts PROMPTS.txt`: CLIP R-Precision (see fastdream.evaluate)."""
from __future__ import annotations

import argparse
import json

from .. import atomic
from ..evaluate import DEFAULT_CLIP, EXAMPLE_PROMPTS, EvalProtocol, evaluate_runs, format_table, read_prompts
from ..evaluate import __doc__ as EVAL_DOC
from .options import integer, number


def run_eval(args) -> int:
    prompts = read_prompts(args.prompts)
    protocol = EvalProtocol(views=args.views, elevation=args.elevation, resolution=args.resolution,
                            background=args.background, distance=args.distance, fov=args.fov)
    report = evaluate_runs(args.runs, prompts, clip_models=args.clip, pretrained=args.pretrained, protocol=protocol,
                           device=args.device, save_renders=args.save_renders, cache_dir=args.clip_cache)
    report["prompts_file"] = str(args.prompts)
    if args.json:
        atomic.write_text(args.json, json.dumps(report, indent=2))
    print(format_table(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="CLIP R-Precision of finished runs (colour and textureless renders), as in DreamFusion",
        description=EVAL_DOC.split("\n\n")[0] + " Renders each run from fixed cameras (elevation 30, azimuths evenly "
        "around the object) and ranks its own prompt among all prompts of --prompts with CLIP.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by `fastdream run` / `fastdream batch`")
    p.add_argument("--prompts", required=True, metavar="PROMPTS.txt",
                   help="candidate captions, one a line; every run's own prompt must be among them "
                        f"(example set: {EXAMPLE_PROMPTS})")
    p.add_argument("--clip", nargs="+", default=[DEFAULT_CLIP], metavar="MODEL",
                   help="open_clip model names (paper: ViT-B-32 ViT-B-16 ViT-L-14), local-dir:FOLDER, hf-hub:ID or a config .json")
    p.add_argument("--pretrained", nargs="+", default=None, metavar="TAG_OR_PATH",
                   help="weights: an open_clip tag (default 'openai'), a local checkpoint file, or 'none' (random); "
                        "one for all models or one per --clip model")
    p.add_argument("--clip-cache", default=None, metavar="DIR", help="download cache for CLIP weights (default: the HF cache)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the full report (per-run hits and top prompts) here")
    p.add_argument("--views", type=integer(1), default=8, help="cameras per run, azimuths evenly spaced (default 8)")
    p.add_argument("--elevation", type=number(-90.0, 90.0), default=30.0, help="camera elevation in degrees (default 30)")
    p.add_argument("--resolution", type=integer(16), default=224, help="render size in pixels (default 224)")
    p.add_argument("--distance", type=number(above=0.0), default=None, help="camera distance (default: the run's video camera)")
    p.add_argument("--fov", type=number(above=0.0, below=180.0), default=None, help="vertical field of view in degrees (default: the run's video camera)")
    p.add_argument("--background", choices=("white", "learned"), default="white", help="render background (default white)")
    p.add_argument("--save-renders", default=None, metavar="DIR", help="also write each run's renders as one PNG strip")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=run_eval)
    return p
