"""Host overhead of one training step: ATen ops dispatched, ops that launch kernels, host syncs.

    python -m benchmarks.bench_overhead [--device cpu|cuda] [--quick] [--json OUT] [--steps N]

Runs the real ``Trainer.train_step`` (default RunConfig: 64x64, batch 1, lambertian/textureless
shading after the albedo warm-up) under a ``TorchDispatchMode`` that counts every ATen op, twice:
with reference guidance (no network: every op is the engine's) and with the tiny test UNet/VAE
(ops inside the UNet/VAE, forward and backward, are counted apart). Per step it reports

* ops outside the UNet/VAE, and of those the ones that launch kernels (views, ``empty``, ``detach``
  and other metadata-only ops excluded);
* host syncs: ``aten::_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``), ``.tolist()``,
  ``nonzero``, boolean-mask indexing / ``masked_select``, and ops whose output size depends on data
  (``fastdream::march``, ``unique``); on a GPU each of these waits for the device.

Counts are device-independent, so the CPU measures them. Targets (issue tracker): at most 1 host sync
and at most 250 ops outside the UNet/VAE per step on the default config.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from . import common  # noqa: E402

# Ops that only create or reinterpret tensor metadata (no kernel on a GPU).
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "_unsafe_view", "view",
              "_reshape_alias", "as_strided", "t", "transpose", "permute", "expand", "select", "slice", "unsqueeze",
              "squeeze", "unbind", "split", "split_with_sizes", "chunk", "narrow", "view_as_real", "view_as_complex",
              "_to_copy_noop", "unfold", "diagonal", "set_", "resize_", "_has_compatible_shallow_copy_type",
              "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_local_scalar_dense"}
# Ops whose output size is read from device data (a sync on a GPU).
_DATA_DEPENDENT = {"nonzero", "nonzero_static_noop", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
                   "unique_consecutive", "march_rays"}


def _is_sync(func, args) -> bool:
    name = func._schema.name.split("::")[-1]
    if name == "_local_scalar_dense" or name in _DATA_DEPENDENT:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if name == "repeat_interleave":  # without output_size its length is read from the repeats
        return True
    return False


def _launches_kernel(func) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in _NO_KERNEL:
        return False
    returns = func._schema.returns
    # a returned alias that is not written to is a view (no kernel)
    return not (returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write)


class OpCounter(TorchDispatchMode):
    """Counts ATen ops and host syncs; ops while ``inside`` > 0 (the UNet/VAE) are counted apart.

    ``.tolist()`` never reaches the dispatcher, so it is wrapped for the duration of the mode.
    """

    def __init__(self):
        super().__init__()
        self.inside = 0
        self.reset()

    def reset(self):
        self.ops = self.kernels = self.syncs = self.network_ops = 0
        self.sync_ops: Counter = Counter()
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside > 0:
            self.network_ops += 1
        else:
            self.ops += 1
            name = func._schema.name
            self.by_op[name] += 1
            self.kernels += _launches_kernel(func)
            if _is_sync(func, args):
                self.syncs += 1
                self.sync_ops[name] += 1
        return func(*args, **kwargs)

    def _count_tolist(self):
        if self.inside == 0:
            self.syncs += 1
            self.sync_ops["Tensor.tolist"] += 1

    def __enter__(self):
        counter, original = self, torch.Tensor.tolist

        def tolist(t):
            counter._count_tolist()
            return original(t)

        self._original_tolist = original
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._original_tolist
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def network(self, *modules):
        """Count the ops of ``modules`` (forward and backward) as the network's, not the engine's."""
        handles = []

        def enter():
            self.inside += 1

        def leave():
            self.inside -= 1

        def pre(module, args):
            enter()
            for a in args:  # backward of this module ends when its input's gradient is produced
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    a.register_hook(lambda g: (leave(), g)[1])

        def post(module, args, out):
            leave()
            first = out[0] if isinstance(out, (tuple, list)) else getattr(out, "latent_dist", out)
            first = getattr(first, "mean", first)
            if isinstance(first, torch.Tensor) and first.requires_grad:
                first.register_hook(lambda g: (enter(), g)[1])

        for m in modules:
            if m is not None:
                handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def default_config(kind: str, model: str = "", scene: str = "", steps: int = 10000):
    from fastdream.config import RunConfig

    config = RunConfig(prompt="a DSLR photo of a hamburger", device="cpu", steps=steps)
    config.guidance.kind = kind
    config.guidance.model = model
    config.guidance.reference_scene = scene
    return config


def count_steps(trainer, first_step: int, n_steps: int) -> Dict:
    """Run ``n_steps`` real train steps from ``first_step`` under the counter; per-step means."""
    g = trainer.guidance
    counter = OpCounter()
    per_step = []
    with counter, counter.network(getattr(g, "unet", None), getattr(g, "vae", None)):
        for s in range(first_step, first_step + n_steps):
            counter.reset()
            trainer.train_step(s)
            per_step.append({"ops": counter.ops, "kernels": counter.kernels, "syncs": counter.syncs,
                             "network_ops": counter.network_ops, "sync_ops": dict(counter.sync_ops)})
    mean = {k: sum(p[k] for p in per_step) / len(per_step) for k in ("ops", "kernels", "syncs", "network_ops")}
    mean["max_syncs"] = max(p["syncs"] for p in per_step)
    mean["max_ops"] = max(p["ops"] for p in per_step)
    mean["sync_ops"] = dict(sum((Counter(p["sync_ops"]) for p in per_step), Counter()))
    mean["steps"] = per_step
    return mean


def build_trainer(kind: str, device: str, tmp: Path, steps: int = 10000):
    from fastdream.guidance import registry
    from fastdream.train import Trainer

    if kind == "reference":
        from fastdream.demo import save_demo_scene

        config = default_config("reference", scene=str(save_demo_scene(tmp / "scene.npz", resolution=32)), steps=steps)
        registry.get("reference").configure_run(config)  # the scene's box and background, as `fastdream run` does
    else:
        sys.path.insert(0, str(common.REPO_ROOT / "tests"))
        import tiny_models

        config = default_config("sd", model=str(tiny_models.make_tiny_sd_pipeline(tmp / "tiny-sd")), steps=steps)
    config.device = device
    config.validate()
    return Trainer(config, tmp / f"run-{kind}", quiet=True, device=torch.device(device))


def time_cuda_graph(trainer, kind: str, first: int, n: int) -> Dict:
    """ms per step with the step's forward and backward replayed from CUDA graphs: the same steps are run
    until every key met in them is captured, then timed."""
    from fastdream.step_capture import StepCapture

    trainer.config.cuda_graph = True
    trainer.capture = StepCapture([trainer.generator, *trainer._guidance_generators().values()])
    for _ in range(3):  # each key: two eager warm-ups, then its capture
        for s in range(first, first + n):
            trainer.train_step(s)
    steps = iter(range(first, first + 10**6))
    timing = common.time_fn(lambda: trainer.train_step(next(steps)), "cuda", warmup=0, repeats=max(n, 8))
    entry = common.result_entry("train_step", f"native/{kind}+cuda_graph", 1, "steps", timing, work=1,
                                work_unit="steps", guidance=kind, graphs=trainer.capture.captures,
                                replays=trainer.capture.replays)
    print(f"  {kind} with CUDA graphs: {entry['median_ms']:.1f} ms/step ({trainer.capture.captures} graphs)", flush=True)
    return entry


def build_parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="counted steps per guidance (default 4; quick 2)")
    return p


def run(args) -> Dict:
    started = time.perf_counter()
    device = common.resolve_device(args.device)
    n = args.steps or (2 if args.quick else 4)
    results: List[Dict] = []
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("reference", "tiny-sd"):
            trainer = build_trainer(kind, device, Path(tmp))
            # past the albedo warm-up, on a step that also updates the occupancy grid
            albedo_end = int(trainer.config.shading.albedo_only_fraction * trainer.config.steps)
            every = trainer.config.grid.update_every
            last = ((albedo_end + n) // every + 1) * every - 1  # a step that also updates the occupancy grid
            first = last - n + 1
            for warm in (first - 2, first - 1):  # warm caches (text embeddings, lazy init) and size the sample buffers
                trainer.train_step(warm)
            c = count_steps(trainer, first, n)
            counts[kind] = c
            timing = common.time_fn(lambda: trainer.train_step(first), device, warmup=0, repeats=n)
            results.append(common.result_entry(
                "train_step", f"native/{kind}", 1, "steps", timing, work=1, work_unit="steps", guidance=kind,
                ops=c["ops"], kernel_ops=c["kernels"], host_syncs=c["syncs"], max_host_syncs=c["max_syncs"],
                max_ops=c["max_ops"], network_ops=c["network_ops"], sync_ops=c["sync_ops"],
                counted_steps=n, first_step=first))
            print(f"  {kind}: {c['ops']:.0f} ops outside the UNet/VAE ({c['kernels']:.0f} launch kernels), "
                  f"{c['syncs']:.1f} host syncs, {c['network_ops']:.0f} UNet/VAE ops; "
                  f"{results[-1]['median_ms']:.1f} ms/step; syncs: {c['sync_ops']}", flush=True)
            if device == "cuda":  # the same step replayed from CUDA graphs (RunConfig.cuda_graph)
                results.append(time_cuda_graph(trainer, kind, first, n))
            del trainer
    ref = counts["reference"]
    targets = [
        common.target("host_syncs_per_step", "host syncs per train step (default config, reference guidance)",
                      ref["max_syncs"], 1, "<=", unit="syncs"),
        common.target("ops_per_step", "ATen ops outside the UNet/VAE per train step (default config)",
                      ref["max_ops"], 250, "<=", unit="ops"),
    ]
    config = {"render": "64x64 batch 1 (RunConfig defaults)", "counted_steps": n, "guidance": ["reference", "tiny-sd"],
              "counter": "TorchDispatchMode over Trainer.train_step"}
    notes = ["op and sync counts do not depend on the device; ms/step is this machine's CPU"]
    return common.make_result("overhead", args, config, results, [], targets, started, notes)


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.finish(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
