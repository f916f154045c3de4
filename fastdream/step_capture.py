"""Replaying the training step's forward and backward from CUDA graphs (``RunConfig.cuda_graph``).

A training step launches hundreds of small kernels; on a fast GPU the host's dispatch of them, not the
kernels, bounds the step. A CUDA graph replays the whole forward and backward with one launch. What makes
the step capturable:

* static shapes and no host sync inside: fixed-capacity sample buffers (`fastdream.sample_buffer`); the
  loss, its terms and the buffer totals are read back after the replay;
* host decisions taken before any device work (`fastdream.stages.StepPlan`, the guidance's ``step_key``,
  the cameras' view range and the buffers' capacities): together they are the step's *key*, and one graph
  is captured per key; the continuous weights (ramped regulariser weights) enter through one device
  tensor that is copied in before each replay, never as floats baked into the ops;
* random draws from generators registered with the graph (each replay advances their offsets);
* gradients in the graph's memory: after a replay every parameter's ``.grad`` points at that graph's
  gradient tensors, which the (eager) optimizer step then reads.

A key runs eagerly ``warmup`` times before it is captured (lazy initialisation, library workspaces), as
PyTorch's whole-network capture recipe asks; at most ``max_graphs`` graphs are kept, least recently used
out. A key that changes every step (a view range that widens over training) gains nothing: those steps
run eagerly until the key settles.

Without a GPU there is no ``torch.cuda.CUDAGraph``; ``emulate=True`` keeps the same bookkeeping and
"replays" by running the step's Python again on the same static inputs, with host side effects inside
the step suppressed as a real replay would (`replaying`). The tests use it to check the plumbing against
the eager step, and check separately that steps with equal keys dispatch identical ops, which is what
makes one graph valid for all of them.
"""
from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict
from typing import Any, Callable, Hashable, List, Optional, Sequence

import torch

_replaying = 0


def replaying() -> bool:
    """True while a step is being captured or replayed: host-side bookkeeping inside the step (counters,
    periodic checks that read the device) must not run there; the loop does it for the replayed step."""
    return _replaying > 0 or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def _inside_replay():
    global _replaying
    _replaying += 1
    try:
        yield
    finally:
        _replaying -= 1


class _Graph:
    """One captured step: its static input, outputs and parameter gradients."""

    def __init__(self, values: torch.Tensor, outputs: Any, grads: List[Optional[torch.Tensor]], replay: Callable[[], Any]):
        self.values, self.outputs, self.grads, self._replay = values, outputs, grads, replay

    def replay(self) -> Any:
        return self._replay()


class _EmulatedGraph(_Graph):
    """The CPU stand-in: each replay runs the step again and writes its outputs into the first replay's
    tensors, as a graph writes into the same memory every replay."""

    def __init__(self, values: torch.Tensor, step_fn: Callable[[torch.Tensor], Any], params):
        super().__init__(values, None, [], self._run)
        self._step_fn, self._params = step_fn, list(params)

    def _run(self) -> Any:
        for p in self._params:
            p.grad = None
        outputs = self._step_fn(self.values)
        self.grads = [p.grad for p in self._params]
        if self.outputs is None:
            self.outputs = outputs
        else:
            _copy_into(self.outputs, outputs)
        return self.outputs


class StepCapture:
    def __init__(self, generators: Sequence[torch.Generator] = (), warmup: int = 2, max_graphs: int = 4,
                 emulate: bool = False):
        self.generators = [g for g in generators if g is not None and g.device.type == "cuda"]
        self.warmup = int(warmup)
        self.max_graphs = int(max_graphs)
        self.emulate = bool(emulate)
        self._graphs: "OrderedDict[Hashable, _Graph]" = OrderedDict()
        self._eager_runs: Counter = Counter()
        self.captures = 0
        self.replays = 0

    def run(self, key: Hashable, values: torch.Tensor, step_fn: Callable[[torch.Tensor], Any],
            params: Sequence[torch.nn.Parameter]) -> Any:
        """The outputs of ``step_fn(values)`` (forward and backward of one step, writing the gradients of
        ``params``): run eagerly for a new key's first ``warmup`` steps, then from the key's graph. Returns the
        replay's output tensors, which the next replay of the same key overwrites (copy what must outlive it)."""
        graph = self._graphs.get(key)
        if graph is None:
            self._eager_runs[key] += 1
            if self._eager_runs[key] <= self.warmup:
                return step_fn(values)
            graph = self._capture(values, step_fn, params)
            self._graphs[key] = graph
            self.captures += 1
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph.values.copy_(values)
        with _inside_replay():
            graph.replay()
        for p, g in zip(params, graph.grads):
            p.grad = g
        self.replays += 1
        return graph.outputs

    def forget(self) -> None:
        """Drop every graph (the parameters or buffers they read were replaced)."""
        self._graphs.clear()
        self._eager_runs.clear()

    def _capture(self, values: torch.Tensor, step_fn, params) -> _Graph:
        static = values.clone()
        for p in params:  # the backward then allocates each gradient in the graph's memory, refilled by replays
            p.grad = None
        if self.emulate:
            return _EmulatedGraph(static, step_fn, params)
        cuda_graph = torch.cuda.CUDAGraph()
        for gen in self.generators:
            cuda_graph.register_generator_state(gen)
        torch.cuda.synchronize()
        with _inside_replay(), torch.cuda.graph(cuda_graph):
            outputs = step_fn(static)
        grads = [p.grad for p in params]
        return _Graph(static, outputs, grads, cuda_graph.replay)


def _copy_into(target: Any, source: Any) -> None:
    if isinstance(target, torch.Tensor):
        target.copy_(source)
    elif isinstance(target, dict):
        for k in target:
            _copy_into(target[k], source[k])
    elif isinstance(target, (list, tuple)):
        for t, s in zip(target, source):
            _copy_into(t, s)
