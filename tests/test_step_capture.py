"""The capturable training step (fastdream.step_capture): what makes one CUDA graph valid for many steps,
checked on the CPU.

A graph replays exactly the ops, shapes and baked-in scalars of the step it was captured on. So: steps
with equal keys must dispatch identical op sequences (op, argument shapes and dtypes, every non-tensor
argument), including while the regulariser weights ramp every step; and the loop's replay plumbing
(static inputs, gradients in the graph's memory, outputs overwritten by the next replay) must train
exactly as the eager loop does.
"""
from collections import defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastdream.errors import FastDreamError
from fastdream.step_capture import StepCapture, replaying

FIRST_STEP = 1000  # past the albedo-only warm-up: the shading mode (part of the key) is drawn at random


def _trainer(tmp_path, name, device="cpu"):
    """The default recipe with reference guidance, at 16x16 and with a small hash table (speed only)."""
    from benchmarks import bench_overhead
    from fastdream.demo import save_demo_scene
    from fastdream.guidance import registry
    from fastdream.train import Trainer

    scene = tmp_path / "scene.npz"
    if not scene.exists():
        save_demo_scene(scene, resolution=16)
    cfg = bench_overhead.default_config("reference", scene=str(scene))
    cfg.device = device
    registry.get("reference").configure_run(cfg)
    cfg.width = cfg.height = 16
    cfg.field.log2_hashmap_size, cfg.field.n_levels, cfg.grid.resolution = 12, 8, 32
    cfg.render.samples_per_ray = 64
    # both regulariser weights ramp every step: they must reach the step as device values, not baked floats
    cfg.reg.orientation, cfg.reg.orientation_end, cfg.reg.opacity_entropy = 10.0, 100.0, 1e-3
    return Trainer(cfg.validate(), tmp_path / name, quiet=True, device=torch.device(device))


def _describe(arg) -> str:
    if isinstance(arg, torch.Generator):  # each dispatch wraps the generator in a new Python object
        return f"Generator({arg.device}, seed={arg.initial_seed()})"
    return repr(arg)


class _OpTrace(TorchDispatchMode):
    """Each op with its argument shapes/dtypes and its non-tensor arguments: what a graph bakes in."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves, _ = tree_flatten((args, kwargs or {}))
        sig = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else _describe(a) for a in leaves)
        self.ops.append((str(func), sig))
        return func(*args, **(kwargs or {}))


def test_steps_with_equal_keys_dispatch_identical_ops(tmp_path):
    trainer = _trainer(tmp_path, "trace")
    traces, weights = defaultdict(list), []
    forward_backward = trainer._forward_backward

    def traced(step, progress, view_progress, plan, values, buffers):
        key = trainer.step_key(plan, progress, view_progress, buffers)
        weights.append(values.tolist())
        with _OpTrace() as trace:
            out = forward_backward(step, progress, view_progress, plan, values, buffers)
        traces[key].append(trace.ops)
        return out

    trainer._forward_backward = traced
    trainer.train_step(FIRST_STEP - 1)  # sizes the sample buffers
    traces.clear()
    for step in range(FIRST_STEP, FIRST_STEP + 10):
        trainer.train_step(step)
    # (a step whose samples overflowed the buffers is redone with the same weights)
    assert len({tuple(w) for w in weights}) >= 11, "the ramped weights should differ every step"
    repeated = [ops for ops in traces.values() if len(ops) > 1]
    assert repeated, f"no key came back in 10 steps: {list(traces)}"
    for ops in repeated:
        assert len(ops[0]) > 200
        # a tensor made from host data inside the step would be a host-to-device copy in the middle of a capture
        assert not [op for op in ops[0] if "lift_fresh" in op[0]]
        for other in ops[1:]:
            first_diff = next((i for i, (a, b) in enumerate(zip(ops[0], other)) if a != b), None)
            assert len(other) == len(ops[0]) and first_diff is None, (
                f"same key, different ops at {first_diff}: {ops[0][first_diff]} vs {other[first_diff]}")


def _eager_and_graphed(tmp_path, device, capture):
    eager, graphed = _trainer(tmp_path, "eager", device), _trainer(tmp_path, "graphed", device)
    if capture is None:  # the trainer's own, from the config switch
        graphed.config.cuda_graph = True
        graphed.capture = graphed._build_capture()
        graphed.capture.warmup = 1
    else:
        graphed.capture = capture
    calls = []
    count_call = graphed.guidance.count_call
    graphed.guidance.count_call = lambda: (calls.append(replaying()), count_call())[1]
    losses = {"eager": [], "graphed": []}
    for name, trainer in (("eager", eager), ("graphed", graphed)):
        for step in range(FIRST_STEP - 1, FIRST_STEP + 10):
            out = trainer.train_step(step)
            losses[name].append((out["loss"], out["shading"], sorted(out["terms"])))
    assert graphed.capture.captures >= 1 and graphed.capture.replays >= 2
    assert len(calls) >= 11 and not any(calls)  # every call counted once (redone steps too), never inside a replay
    assert [l[1:] for l in losses["graphed"]] == [l[1:] for l in losses["eager"]]
    return eager, graphed, losses


def test_replayed_steps_train_exactly_as_eager_steps(tmp_path):
    eager, graphed, losses = _eager_and_graphed(tmp_path, "cpu", StepCapture(warmup=1, emulate=True))
    torch.testing.assert_close([l[0] for l in losses["graphed"]], [l[0] for l in losses["eager"]], rtol=1e-5, atol=0)
    for (name, p), q in zip(eager.stage.renderer.named_parameters(), graphed.stage.renderer.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graph_replays_train_as_eager_steps(tmp_path):
    """The real capture: CUDA graphs of the step (random draws from registered generators) against eager."""
    eager, graphed, losses = _eager_and_graphed(tmp_path, "cuda", None)
    torch.testing.assert_close([l[0] for l in losses["graphed"]], [l[0] for l in losses["eager"]], rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(eager.stage.renderer.named_parameters(), graphed.stage.renderer.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_capture_keeps_the_gradients_of_each_graph_and_evicts_the_oldest():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    capture = StepCapture(warmup=0, max_graphs=2, emulate=True)
    step = lambda scale: lambda v: ((w * v * scale).sum().backward(), v * 1)[1]  # noqa: E731
    for key, scale in (("a", 1.0), ("b", 3.0), ("a", 1.0)):
        out = capture.run(key, torch.tensor([2.0, 5.0]), step(scale), [w])
        torch.testing.assert_close(w.grad, torch.tensor([2.0, 5.0]) * scale)  # assigned, not accumulated
        torch.testing.assert_close(out, torch.tensor([2.0, 5.0]))
    capture.run("c", torch.ones(2), step(1.0), [w])
    assert capture.captures == 3 and list(capture._graphs) == ["a", "c"]


def test_cuda_graph_needs_fixed_capacity_buffers():
    from fastdream.config import RunConfig

    config = RunConfig(prompt="a vase", cuda_graph=True)
    config.render.fixed_capacity = False
    with pytest.raises(FastDreamError, match="fixed_capacity"):
        config.validate()
