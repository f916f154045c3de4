"""Fixed-capacity sample buffers: static shapes for the training step's render, sized on the host.

The number of samples a render marches (and keeps after the gradient-free pruning pass) depends on the
occupancy grid and the cameras, so sizing the packed arrays exactly would need a host read of a device
count every render. Instead the renderer marches into a buffer of `marched` slots and compacts the kept
samples into one of `kept` slots (padding: zero-length intervals, weight 0, no gradient), and records the
true totals on the device. The training loop reads them back with the loss (the step's one host sync) and
calls `settle`: when a total exceeded its capacity the step's samples were cut short, the buffers grow
and the loop redoes the step; when the totals have fallen far below the capacities the buffers shrink.
The first render of a buffer calibrates it: it runs the dynamic path (one sync) and sizes the capacities
from its counts. Capacities are rounded up to multiples of `granularity`, so the shapes change rarely.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


class SampleBuffer:
    def __init__(self, headroom: float = 1.25, first_headroom: float = 1.25, shrink_below: float = 0.4,
                 shrink_window: int = 200, granularity: int = 4096):
        self.headroom = float(headroom)          # capacity = total * headroom, rounded up
        # The first sizing has seen one render only (the totals vary several-fold with the camera's distance and
        # focal length), but every slot of the kept buffer is queried with gradients and normals, so the step's
        # memory grows with this headroom: by default no more than later (an overflow costs one redone step).
        self.first_headroom = float(first_headroom)
        # Shrink only when the largest total of a whole window of steps fell below this fraction of the capacity:
        # a shrink after one small total would overflow at the next close-up.
        self.shrink_below = float(shrink_below)
        self.shrink_window = int(shrink_window)
        self.granularity = int(granularity)
        self._window_max = (0, 0)
        self._window_steps = 0
        self.marched: Optional[int] = None       # slots of the march buffer (None: not calibrated yet)
        self.kept: Optional[int] = None          # slots of the buffer of samples kept after pruning
        self.pending: Optional[torch.Tensor] = None  # (2,) int64 on the device: max (marched, kept) totals
        self.grown = 0                           # times a step overflowed and the buffers grew

    @property
    def calibrated(self) -> bool:
        return self.marched is not None

    def size_for(self, total: int, headroom: Optional[float] = None) -> int:
        g = self.granularity
        return max(g, int(math.ceil(total * (headroom or self.headroom) / g)) * g)

    def calibrate(self, marched: int, kept: int) -> None:
        """Capacities from the host counts of a dynamic render."""
        self.marched = max(self.marched or 0, self.size_for(marched, self.first_headroom))
        self.kept = min(self.marched, max(self.kept or 0, self.size_for(kept, self.first_headroom)))

    def capacities(self) -> Tuple[Optional[int], Optional[int]]:
        return self.marched, self.kept

    def set_capacities(self, capacities) -> None:
        self.marched, self.kept = (None if c is None else int(c) for c in capacities)

    def record(self, n_marched: torch.Tensor, n_kept: torch.Tensor) -> None:
        """The device totals (0-d tensors) of one render (or one chunk of rays); a step keeps the largest."""
        counts = torch.stack([n_marched, n_kept]).to(torch.int64)
        self.pending = counts if self.pending is None else torch.maximum(self.pending, counts)

    def take(self) -> Optional[torch.Tensor]:
        pending, self.pending = self.pending, None
        return pending

    def settle(self, totals: Tuple[float, float]) -> bool:
        """The step's totals, read back on the host. Returns True when they overflowed the buffers (the step's
        samples were cut short and the step must be redone); the capacities then fit the totals."""
        marched, kept = int(totals[0]), int(totals[1])
        overflow = marched > self.marched or kept > self.kept
        if overflow:
            self.grown += 1
            self.marched = max(self.marched, self.size_for(marched))
            self.kept = max(self.kept, self.size_for(kept))
        self._window_max = (max(self._window_max[0], marched), max(self._window_max[1], kept))
        self._window_steps += 1
        if self._window_steps >= self.shrink_window:
            top_marched, top_kept = self._window_max
            if top_marched < self.shrink_below * self.marched:
                self.marched = self.size_for(top_marched)
            if top_kept < self.shrink_below * self.kept:
                self.kept = self.size_for(top_kept)
            self._window_max, self._window_steps = (0, 0), 0
        self.kept = min(self.kept, self.marched)
        return overflow
