"""Numeric command-line options, checked where they are parsed: finite, in range, one line of error
(`fastdream CMD: error: argument --steps: must be an integer >= 0, got '-3'`)."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


def integer(minimum: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        bound = f" >= {minimum}" if minimum is not None else ""
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer{bound}, got {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer{bound}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum: Optional[float] = None, maximum: Optional[float] = None, *, above: Optional[float] = None,
           below: Optional[float] = None) -> Callable[[str], float]:
    """A finite float; `minimum`/`maximum` are inclusive bounds, `above`/`below` exclusive ones."""
    parts = [f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else "",
             f"<= {maximum:g}" if maximum is not None else "", f"< {below:g}" if below is not None else ""]
    bound = " and ".join(p for p in parts if p)
    wanted = "a finite number" + (f" {bound}" if bound else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if (not math.isfinite(value) or (minimum is not None and value < minimum)
                or (above is not None and value <= above) or (maximum is not None and value > maximum)
                or (below is not None and value >= below)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other fastdream error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
