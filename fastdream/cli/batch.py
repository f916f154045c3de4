"""`fastdream batch PROMPTS.txt --out DIR`: every prompt through `fastdream run` (see fastdream.batch)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from ..batch import changed_options, run_batch
from ..errors import FastDreamError
from ..guidance import registry
from .options import integer, number


def collect_run_args(args) -> List[str]:
    out: List[str] = []
    for flag, value in (("--steps", args.steps), ("--seed", args.seed), ("--model", args.model),
                        ("--guidance", args.guidance), ("--reference-scene", args.reference_scene),
                        ("--device", args.device)):
        if value is not None:
            out += [flag, str(value)]
    if args.config:
        out += ["--config", str(Path(args.config).resolve())]
    for item in args.set or ():
        out += ["--set", item]
    for item in args.run_arg or ():
        out.append(item)
    return out


def run_options(run_args: List[str]):
    """(config file, --set overrides, dedicated flags) of `fastdream run` arguments, read with run's own parser;
    None when they do not parse (then `fastdream run` itself reports them)."""
    from .run import add_parser as add_run_parser

    parser = argparse.ArgumentParser(add_help=False)
    add_run_parser(parser.add_subparsers(dest="command"))
    try:
        args, _ = parser.parse_known_args(["run", "prompt", *run_args])
    except SystemExit:
        return None
    flags = dict(steps=args.steps, seed=args.seed, device=args.device, guidance=args.guidance, model=args.model,
                 reference_scene=args.reference_scene)
    return args.config, args.set or [], flags


def _cmd_batch(args) -> int:
    if args.reference_scene and not Path(args.reference_scene).exists():
        raise FastDreamError(f"Reference scene {args.reference_scene} does not exist.")
    if args.reference_scene:
        args.reference_scene = str(Path(args.reference_scene).resolve())
    run_args = collect_run_args(args)
    options = run_options(run_args)
    changes = (lambda folder: changed_options(folder, *options)) if options is not None else None
    return run_batch(args.prompts, args.out, run_args, ray=args.ray, gpus=args.gpus, workers=args.workers,
                     device=args.device, cpus_per_task=args.cpus_per_task, changes=changes)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "batch", help="run every prompt of a file (one folder each), on all local GPUs or a Ray cluster; resumable",
        description="Run `fastdream run` for every prompt of PROMPTS.txt, one output folder each, one worker per "
                    "local GPU or one Ray task per prompt; finished prompts are skipped on a rerun, and DIR/summary.json "
                    "records each prompt's status, time and error.")
    p.add_argument("prompts", metavar="PROMPTS.txt", help="one prompt a line ('#' comments and blank lines ignored)")
    p.add_argument("--out", required=True, metavar="DIR", help="one folder per prompt is made here, plus summary.json and logs/")
    where = p.add_argument_group("where the prompts run")
    where.add_argument("--gpus", default=None, metavar="0,1,...",
                       help="local GPUs, one worker each (default: all visible; 'none' for the CPU)")
    where.add_argument("--workers", type=integer(1), default=None,
                       help="CPU workers when no GPU is used (default 1); with --gpus, workers per GPU")
    where.add_argument("--ray", default=None, metavar="ADDRESS",
                       help="run on Ray: 'auto', HOST:6379, ray://HOST:10001, or 'local' for a Ray instance on this machine")
    where.add_argument("--cpus-per-task", type=number(above=0.0), default=1.0, help="Ray: CPUs each task asks for (default 1)")
    run = p.add_argument_group("passed to every `fastdream run`")
    run.add_argument("--steps", type=integer(1), default=None)
    run.add_argument("--seed", type=integer(0), default=None)
    run.add_argument("--model", default=None, metavar="ID_OR_DIR")
    run.add_argument("--guidance", default=None, choices=registry.names())
    run.add_argument("--reference-scene", default=None, metavar="SCENE")
    run.add_argument("--device", default=None, help="auto | cuda | cpu (GPUs are chosen per worker with --gpus)")
    run.add_argument("--config", default=None, metavar="FILE.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="configuration override (repeatable)")
    run.add_argument("--run-arg", action="append", default=[], metavar="ARG",
                     help="any other `fastdream run` argument, one token each, e.g. --run-arg=--quiet (repeatable)")
    p.set_defaults(func=_cmd_batch)
    return p
