"""`fastdream run PROMPT` (text to 3D) and `fastdream run --image PHOTO [PROMPT]` (image to 3D); see
fastdream.runs.run."""
from __future__ import annotations

import logging
import sys

from .. import runs
from ..config import PRESETS
from ..train import EXIT_CODES
from ..guidance import registry
from .options import integer


def _cmd_run(args) -> int:
    if not args.quiet:
        logging.getLogger("fastdream").setLevel(logging.INFO)
    cli = {"steps": args.steps, "seed": args.seed, "device": args.device, "guidance": args.guidance,
           "model": args.model, "reference_scene": args.reference_scene, "image": args.image, "stages": args.stages}
    if not args.prompt and not args.image:
        print("fastdream run: error: give a PROMPT (text to 3D) or --image PHOTO (image to 3D) (see fastdream run "
              "--help)", file=sys.stderr)
        return 2
    result = runs.run(args.prompt or "", args.out, overrides=args.set or [], config_file=args.config, resume=args.resume,
                      force=args.force, quiet=args.quiet, cli=cli, preset=args.preset)
    if result.get("interrupted"):
        sig = result.get("signal") or "SIGINT"
        if result.get("saved"):
            what = f"at step {result['step']}; checkpoint {result['checkpoint']} saved"
        else:
            kept = f"the last checkpoint, {result['checkpoint']}, is kept" if result.get("checkpoint") else "no checkpoint yet"
            what = (f"during step {result['step'] + 1}; nothing saved (a half-done step would not resume exactly), "
                    f"{kept}")
        hint = " Continue with --resume." if result.get("checkpoint") else ""
        print(f"fastdream run: stopped by {sig} {what}.{hint}", file=sys.stderr)
        return EXIT_CODES.get(sig, 130)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="text to 3D: optimise a radiance field with SDS, then export a mesh and turntable videos",
        description="Optimise a hash-grid radiance field from a text prompt with Score Distillation Sampling "
                    "(DreamFusion), then write mesh.obj/.ply/.glb, turntable videos and metrics.json.")
    p.add_argument("prompt", nargs="?", help="what to create, e.g. \"a vase with pink flowers\" (optional with --image)")
    p.add_argument("--image", help="image to 3D: a photo of the object (RGBA PNG whose alpha is the object's mask, or "
                                   "RGB with rembg installed) seen as the front view; settings under image.* "
                                   "(elevation 0, distance 3.8 scene radii, 20 degree field of view by default)")
    p.add_argument("--out", help="output folder (default outputs/<prompt slug>)")
    p.add_argument("--model", help="diffusion model: hub id or local diffusers folder (default per --guidance)")
    p.add_argument("--steps", type=integer(), help="optimisation steps (default 10000)")  # range: RunConfig.validate
    p.add_argument("--stages", help="the stages to train, in order: nerf (the default) or nerf,mesh (a textured "
                                    "mesh refined at 512x512 after the NeRF stage, as Magic3D; settings under mesh.*)")
    p.add_argument("--seed", type=integer(0), help="random seed (default 0)")
    p.add_argument("--config", help="YAML file with configuration keys (see DIR/config.yaml of any run)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named set of overrides applied before --config and --set: 'draft' is a one-minute GPU "
                        "preview (smaller field, 32x32 renders, 1,000 steps; every other setting at its default)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a configuration key, dotted for sections (e.g. --set optim.lr_hash=0.02); repeatable")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last checkpoint")
    p.add_argument("--force", action="store_true", help="start over in a non-empty output folder (deletes its fastdream outputs)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--guidance", choices=registry.names(),
                   help="guidance family: " + "; ".join(f"{f.name}: {f.description}" for f in registry.families())
                   + " (default sd)")
    p.add_argument("--reference-scene", dest="reference_scene",
                   help="with --guidance reference: an .npz voxel scene (density, albedo, aabb) or a mesh")
    p.add_argument("--quiet", action="store_true", help="no progress bar; a log line every output.log_every steps")
    p.set_defaults(func=_cmd_run)
