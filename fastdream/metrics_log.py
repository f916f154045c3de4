"""Per-step training log: `metrics.jsonl` in the run folder, and optionally TensorBoard.

One JSON object a line: step, time (seconds of training so far), loss and its terms, SDS gradient norm,
mean timestep t, shading, occupied fraction of the occupancy grid, samples per ray, skipped steps.
Device values are kept on the device and read back together every `flush_every` steps (one transfer
for the whole window), so logging adds no host sync per step.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

log = logging.getLogger("fastdream")

FILENAME = "metrics.jsonl"


def read_metrics(path) -> List[Dict[str, Any]]:
    """The rows of a metrics.jsonl (a partly written last line is skipped)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLog:
    def __init__(self, folder, flush_every: int = 100, tensorboard: bool = False, resume_step: Optional[int] = None):
        self.path = Path(folder) / FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_every = max(1, int(flush_every))
        self._pending: List[Tuple[Dict[str, Any], List[str], torch.Tensor]] = []
        if resume_step is not None:  # drop rows past the checkpoint: the resumed run writes them again
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("fastdream: output.tensorboard=true but the tensorboard package is not installed "
                            "(pip install tensorboard); logging to metrics.jsonl only.")
            else:
                self._tb = SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=resume_step)

    def record(self, host: Dict[str, Any], device: Dict[str, torch.Tensor]) -> None:
        """host: plain values (step, time, shading, ...); device: 0-d tensors, read back at the next flush."""
        keys = list(device)
        values = torch.stack([v.detach().float().reshape(()) for v in device.values()]) if keys else torch.zeros(0)
        self._pending.append((dict(host), keys, values))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        flat = torch.cat([v.reshape(-1) for _, _, v in self._pending])
        numbers = flat.tolist()  # the one readback for the whole window
        lines, i = [], 0
        for host, keys, _ in self._pending:
            row = dict(host)
            for k in keys:
                x = numbers[i]
                i += 1
                row[k] = x if math.isfinite(x) else None
            lines.append(row)
        self._pending.clear()
        with self.path.open("a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in lines))
        if self._tb is not None:
            for row in lines:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                        self._tb.add_scalar(f"train/{k}", v, row["step"])
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
