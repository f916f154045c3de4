"""`fastdream` command line. Each command lives in its own module, which defines
`add_parser(subparsers)` and sets `func` on its parser; modules are imported only when listed here,
and heavy dependencies (diffusers, open_clip, ray) only when a command runs."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from . import __version__
from .atomic import disk_full_error, is_disk_full
from .errors import FastDreamError

COMMAND_MODULES = [
    "fastdream.train",      # run, export
    "fastdream.fit",        # fit
    "fastdream.evaluate",   # eval
    "fastdream.batch",      # batch
]


def _doctor(args) -> int:
    from . import info

    info()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdream", description="Fast text-to-3D: DreamFusion on hash-grid radiance fields.")
    parser.add_argument("--version", action="version", version=f"fastdream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command not built yet
                continue
            raise
        module.add_parser(sub)
    doctor = sub.add_parser("doctor", help="print the backend, compiled CUDA archs, versions and optional accelerators")
    doctor.set_defaults(func=_doctor)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
