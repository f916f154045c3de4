"""`fastdream doctor`: the backend, compiled CUDA archs, versions and optional accelerators."""
from __future__ import annotations


def _cmd_doctor(args) -> int:
    from ..diagnostics import collect_info, format_info

    print(format_info(collect_info()))
    return 0


def add_parser(subparsers) -> None:
    doctor = subparsers.add_parser("doctor", help="print the backend, compiled CUDA archs, versions and optional accelerators")
    doctor.set_defaults(func=_cmd_doctor)
