"""`fastdream` command line. Each command lives in its own module of this package, which defines
`add_parser(subparsers)` and sets `func` on its parser: argument parsing and printing only, the work
is done by library functions (fastdream.runs, fit, evaluate, batch, diagnostics). Heavy dependencies
(diffusers, open_clip, ray) are imported only when a command runs."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from .._version import __version__
from ..atomic import disk_full_error, is_disk_full
from ..errors import FastDreamError
from .options import Parser

COMMAND_MODULES = [f"fastdream.cli.{name}" for name in ("run", "export", "fit", "eval", "batch", "view", "doctor")]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastdream", description="Fast text-to-3D: DreamFusion on hash-grid radiance fields.")
    parser.add_argument("--version", action="version", version=f"fastdream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed on one line
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    # huggingface_hub prints through a handler of its own (as transformers and diffusers do, which do not
    # propagate): passed on to ours too, each of its warnings would appear twice.
    logging.getLogger("huggingface_hub").propagate = False
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FastDreamError as exc:
        print(f"fastdream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastdream {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        print(f"fastdream {args.command}: error: {disk_full_error(exc.filename or 'its output', exc)}", file=sys.stderr)
        return 2
