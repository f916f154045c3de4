"""Progress with an ETA for every long phase (training, mesh extraction, texture bake, turntables).

On a terminal it is a tqdm bar; when stderr is not a terminal (a log file, CI, a batch worker) it is one
plain log line every `every` updates (and at the end), so redirected output holds no carriage-return frames.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

log = logging.getLogger("fastdream")


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


class LineProgress:
    """The non-terminal twin of a tqdm bar: `update`, `set_postfix`, `close`, one line every `every` units."""

    def __init__(self, total: int, desc: str, every: int, initial: int = 0, unit: str = "it"):
        self.total, self.desc, self.every, self.unit = int(total), desc, max(1, int(every)), unit
        self.n = self.start = int(initial)
        self.t0 = time.perf_counter()
        self.postfix = ""

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = "  ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.n // self.every > before // self.every or self.n >= self.total > before:
            self.line()

    def line(self) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = (self.n - self.start) / max(elapsed, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        tail = f"  {self.postfix}" if self.postfix else ""
        log.info("%s %d/%d  %.2f %s/s  elapsed %s  ETA %s%s", self.desc, self.n, self.total, rate, self.unit,
                 _clock(elapsed), _clock(eta), tail)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Silent(LineProgress):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress(total: int, desc: str, every: Optional[int] = None, initial: int = 0, quiet: bool = False,
             unit: str = "it", stream=None, line_desc: Optional[str] = None):
    """A tqdm bar on a terminal, else a LineProgress logging every `every` units (default: about 10 lines).

    quiet: no bar even on a terminal; lines still come every `every` units when `every` is given.
    line_desc: what the plain lines start with (default desc).
    """
    line_desc = line_desc or desc
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    if tty and not quiet:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, dynamic_ncols=True, unit=unit, desc=desc, file=stream, smoothing=0.1)
    if quiet and every is None:
        return _Silent(total, line_desc, 1, initial, unit)
    return LineProgress(total, line_desc, every or max(1, (total - initial) // 10), initial, unit)
