"""The training loop, shared by every stage (see `fastdream.stages`).

Each step: sample cameras and a point light (DreamFusion's ranges), ask the stage for the loss of that
batch, take an Adam step over the stage's parameter groups (skipped, with the gradients dropped, when
the loss or a gradient is not finite), then let the stage do its per-step housekeeping. The loop owns
the step counter, the NaN guard, Ctrl-C and SIGTERM (a checkpoint at the last completed step; a second
signal stops at once without writing), atomic checkpoints (with every random generator's state, so that
a resumed run equals an uninterrupted one), progress and previews.

Randomness: one torch.Generator on the training device (seed) drives cameras, lights and whatever the
stage draws (shading choices, occupancy-grid updates); the guidance draws t and noise from its own
generator (seed + 1); the parameters are initialised from torch's global generator seeded with `seed`.
Same seed, config and device => same result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .cameras import orbit_cameras, sample_cameras, view_ranges
from .checkpoint import checkpoint_name, save_checkpoint
from .config import RunConfig, config_to_dict
from .errors import FastDreamError
from .renderer import Renderer
from .runtime import resolve_device, versions
from .sample_buffer import SampleBuffer
from .stages import Stage, build_stage, stage_class
from .step_capture import StepCapture

log = logging.getLogger("fastdream")

CHECKPOINT_KIND = "run"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal number, as a shell reports them


def _on_step(trainer: "Trainer", step: int) -> None:
    """Called after every completed step (tests patch it to interrupt a run)."""


def merge_param_groups(groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The stage's parameter groups with consecutive groups of equal settings (all but ``name``) joined, names
    joined by "+": the same updates, and two ops less per joined group in each Adam step (one fused kernel and
    one step-counter increment per group)."""
    merged: List[Dict[str, Any]] = []
    for group in groups:
        last = merged[-1] if merged else None
        if last is not None and _group_settings(last) == _group_settings(group):
            last["params"] = [*last["params"], *group["params"]]
            last["name"] = f"{last.get('name', '')}+{group.get('name', '')}"
        else:
            merged.append(dict(group, params=list(group["params"])))
    return merged


def merged_optimizer_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """An optimizer state dict with its parameter groups joined as merge_param_groups joins them (checkpoints
    written before groups were joined hold one group per stage group; parameter indices are unchanged)."""
    return dict(state, param_groups=merge_param_groups(state["param_groups"]))


def _group_settings(group: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in group.items() if k not in ("params", "name")}


def input_camera(config: RunConfig, scene_radius: float, width: int, height: int, device=None):
    """The fixed camera of an image-to-3D run's input photo: azimuth 0 (the object's front), `image.elevation`,
    `image.distance` scene radii, `image.fov` degrees."""
    im = config.image
    return orbit_cameras(1, width, height, elevation_deg=im.elevation, distance=im.distance * scene_radius,
                         fov_y_deg=im.fov, device=device or "cpu")


def load_input_view(config: RunConfig, scene_radius: float, device: torch.device):
    """(photo, its camera) of an image-to-3D run (`image.path`), or None for text-to-3D."""
    if not config.image.path:
        return None
    from .image_input import load_input_image

    im = config.image
    photo = load_input_image(im.path, resolution=im.resolution, border_ratio=im.border_ratio, recenter=im.recenter)
    return photo, input_camera(config, scene_radius, config.width, config.height, device)


def build_guidance(config: RunConfig, device: torch.device, input_view=None):
    """The guidance the configuration names (see `fastdream.guidance.registry`), conditioned on its prompt, or
    on the input photo (over the run's background colour) and its camera for image-to-3D. With
    `image.text_guidance_weight` > 0 (Magic123's joint prior) a text model's SDS on the prompt is added with that
    weight (a `JointGuidance`); at 0 no text model is loaded."""
    from .guidance import Condition, JointGuidance, build_guidance as build

    g = config.guidance
    common = dict(t_min=g.t_min, t_max=g.t_max, weighting=g.weighting, negative_prompt=g.negative_prompt)
    options = dict(common, guidance_scale=g.guidance_scale, seed=config.seed + 1)
    options.update(g.options)
    guidance = build(g.kind, config.model, device, dtype=g.dtype or None, options=options,
                     reference_scene=g.reference_scene, reference_resolution=g.reference_resolution,
                     render_config=config.render, grid_resolution=config.grid.resolution,
                     background_color=config.background_color)
    if config.image.text_guidance_weight > 0:
        text = build_text_guidance(config, device, dict(common, **g.options))
        guidance = JointGuidance([(g.kind, guidance, 1.0), ("text", text, config.image.text_guidance_weight)])
    image = pose = None
    if input_view is not None:
        photo, pose = input_view
        image = photo.on_background(config.background_color)
    guidance.set_condition(Condition(prompt=config.prompt, negative_prompt=g.negative_prompt, image=image, pose=pose))
    return guidance


def build_text_guidance(config: RunConfig, device: torch.device, options: dict):
    """The text-to-image guidance of an image-to-3D run's joint prior: `image.text_guidance_model` (default: the sd
    family's model) at `image.text_guidance_scale`, with the run's timestep range and its own generator."""
    from .guidance import build_guidance as build

    im = config.image
    options = dict(options, guidance_scale=im.text_guidance_scale, seed=config.seed + 2)
    options.pop("view_dependent", None)  # the novel-view model's setting; text models take view-dependent prompts
    try:
        text = build("sd", im.text_guidance_model, device, dtype=config.guidance.dtype or None, options=options)
    except FastDreamError as exc:
        raise FastDreamError(f"The text guidance of this image-to-3D run (image.text_guidance_weight="
                             f"{im.text_guidance_weight:g}) could not be loaded: {exc} Set image.text_guidance_model "
                             "to a text-to-image model you have, or image.text_guidance_weight=0 to turn it off.") from None
    if "text" not in text.conditioning:
        raise FastDreamError(f"image.text_guidance_model '{im.text_guidance_model}' is a {type(text).__name__}, not a "
                             "text-to-image model; give a Stable Diffusion or DeepFloyd IF model.")
    return text


class Trainer:
    def __init__(self, config: RunConfig, out_dir, quiet: bool = False, device: Optional[torch.device] = None):
        self.config = config.validate()
        self.out_dir = Path(out_dir)
        self.quiet = quiet
        self.device = device or resolve_device(config.device)
        torch.manual_seed(config.seed)  # parameter initialisation
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(config.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.stage_index = 0
        self.stage = build_stage(config.stages[0], config, self.device)
        self._build_optimizer()
        self._unit_scale = torch.ones((), device=self.device)  # the non-finite check's "unscale" by 1
        self.input_view = load_input_view(config, self.stage.scene_radius, self.device)  # before the model: fail fast
        self.guidance = build_guidance(config, self.device, self.input_view)
        self._remember_guidance_options()
        self._enter_stage()
        self.step = 0
        self.n_skipped = 0
        self.consecutive_nonfinite = 0
        self.train_time = 0.0
        self.last_checkpoint: Optional[Path] = None
        self.last_loss = float("nan")
        self._stop_requested = False
        self._in_step = False
        self.stop_signal: Optional[str] = None  # "SIGINT" / "SIGTERM" once a stop was asked for
        self.saved_on_stop = False
        self.capture = self._build_capture()

    @property
    def renderer(self):
        """The stage's renderer (the NeRF stage's field, background and occupancy grid)."""
        return self.stage.renderer

    # ------------------------------------------------------------------ stages
    def stage_start(self, index: Optional[int] = None) -> int:
        """The global step at which stage `index` (default: the current one) starts."""
        index = self.stage_index if index is None else index
        return sum(stage_class(name).n_steps(self.config) for name in self.config.stages[:index])

    @property
    def stage_end(self) -> int:
        return self.stage_start() + self.stage.n_steps(self.config)

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: every stage's, one after the other."""
        return self.stage_start(len(self.config.stages))

    def _build_optimizer(self) -> None:
        o = self.config.optim
        # fused: one kernel for all parameters, step counters kept on the device (no .item() per step)
        self.optimizer = torch.optim.Adam(merge_param_groups(self.stage.param_groups(o)), betas=tuple(o.betas),
                                          eps=o.eps, fused=True)

    def _enter_stage(self) -> None:
        """What the current stage needs from the run: the input view at its render size, its guidance options."""
        if self.input_view is not None:
            photo, _ = self.input_view
            width, height = self.stage.image_size()
            self.stage.set_input_view(photo, input_camera(self.config, self.stage.scene_radius, width, height,
                                                          self.device))
        options = self.stage.guidance_options()
        for model, base in self._base_guidance_options:  # every model of a joint guidance alike
            model.options = dataclasses.replace(base, **options).validate() if options else base

    def _remember_guidance_options(self) -> None:
        """The guidance options the run was configured with, per model, for stages to adjust from."""
        members = getattr(self.guidance, "members", None)
        models = [g for _, g, _ in members] if members else [self.guidance]
        self._base_guidance_options = [(g, g.options) for g in models if getattr(g, "options", None) is not None]

    def _switch_stage(self, index: int, previous: Optional[Stage] = None) -> None:
        """Make stage `index` the current one (started from the trained `previous` stage, if given)."""
        stage = build_stage(self.config.stages[index], self.config, self.device)
        if previous is not None:
            stage.init_from(previous)
        self.stage_index, self.stage = index, stage
        if self.capture is not None:
            self.capture.forget()  # its graphs read the previous stage's parameters
        self._build_optimizer()
        self._enter_stage()

    def next_stage(self) -> None:
        """At the end of a stage: the next one starts from it (the finished stage is checkpointed first)."""
        if self.last_checkpoint is None or self.last_checkpoint.name != checkpoint_name(self.step):
            self.save()
        self.preview()
        log.info("fastdream: the %r stage is done at step %d; starting the %r stage", self.stage.name, self.step,
                 self.config.stages[self.stage_index + 1])
        previous = self.stage
        self.stage = None  # the previous stage's modules can be freed once the next one has copied them
        self._switch_stage(self.stage_index + 1, previous)

    # ------------------------------------------------------------------ state
    def _guidance_generators(self) -> Dict[str, torch.Generator]:
        """The guidance's random generators by checkpoint key: "guidance" (the first model), "guidance_NAME" for
        the other members of a joint guidance."""
        members = getattr(self.guidance, "generators", None) or {"": getattr(self.guidance, "generator", None)}
        gens = {}
        for i, (name, gen) in enumerate(members.items()):
            if isinstance(gen, torch.Generator):
                gens["guidance" if i == 0 else f"guidance_{name}"] = gen
        return gens

    def state_dict(self) -> Dict[str, Any]:
        rng = {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
        for key, gen in self._guidance_generators().items():
            rng[key] = gen.get_state()
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"kind": CHECKPOINT_KIND, "stage": self.stage.name, "step": self.step,
                "config": config_to_dict(self.config), "aabb": list(self.config.aabb), **self.stage.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng, "n_skipped": self.n_skipped,
                "consecutive_nonfinite": self.consecutive_nonfinite, "train_time": self.train_time,
                # the buffers' shapes decide float summation order: a resumed run continues with the same ones
                "sample_buffers": [r.sample_buffer.capacities() for r in self.sample_buffer_renderers()],
                "versions": versions(self.device)}

    def load_state_dict(self, state: Dict[str, Any], source: str = "checkpoint") -> None:
        stage = state.get("stage", "nerf")  # checkpoints from before stages were named hold NeRF runs
        if stage not in self.config.stages:
            raise FastDreamError(f"Checkpoint {source} holds a {stage!r} stage, but this run trains the "
                                 f"{', '.join(self.config.stages)} stage(s); resume with the configuration it was "
                                 "written with.")
        index = self.config.stages.index(stage)
        if index != self.stage_index:
            stage_class(stage)  # an unknown stage: its own clear error
            self._switch_stage(index)
        try:
            self.stage.load_state_dict(state)
            self.optimizer.load_state_dict(merged_optimizer_state(state["optimizer"]))
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FastDreamError(f"Checkpoint {source} does not fit this configuration ({first}). It was written with "
                                 "other field/grid settings; resume without changing them, or start over with --force.") from None
        rng = state.get("rng", {})
        if "generator" in rng:
            self.generator.set_state(rng["generator"].cpu() if self.device.type == "cpu" else rng["generator"])
        if "torch_cpu" in rng:
            torch.set_rng_state(rng["torch_cpu"])
        for key, gen in self._guidance_generators().items():
            if key in rng:
                gen.set_state(rng[key])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        for renderer, capacities in zip(self.sample_buffer_renderers(), state.get("sample_buffers", [])):
            renderer.sample_buffer.set_capacities(capacities)
        self.step = int(state["step"])
        self.n_skipped = int(state.get("n_skipped", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.train_time = float(state.get("train_time", 0.0))

    def check_finite_parameters(self) -> None:
        """Raise (before anything is written) when a parameter went NaN/inf: such a model must not replace a good checkpoint."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            kept = (f"The last good checkpoint is kept: {self.last_checkpoint}." if self.last_checkpoint
                    else "No checkpoint had been written yet.")
            raise FastDreamError(
                f"The model's parameters are no longer finite (NaN or inf) at step {self.step}; nothing was saved or "
                f"exported. {kept} Lower the learning rates (--set optim.lr_hash=..., optim.lr_mlp=...) or the guidance "
                "scale, or clip gradients (--set optim.grad_clip=1), then continue from the checkpoint with --resume "
                "(those --set values apply to the resumed run) or start over with --force.")

    def save(self) -> Path:
        self.check_finite_parameters()
        path = self.out_dir / "checkpoints" / checkpoint_name(self.step)
        save_checkpoint(path, self.state_dict())
        self.last_checkpoint = path
        keep = self.config.output.keep_checkpoints
        if keep > 0:
            for old in sorted((self.out_dir / "checkpoints").glob("step_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)
        return path

    # ------------------------------------------------------------------ one step
    MAX_REDOS = 3  # a step redone after its samples overflowed the buffers (each redo grows them to fit)

    def sample_buffer_renderers(self) -> List[Renderer]:
        """The renderers the step runs with fixed-capacity sample buffers: the stage's and the guidance's (the
        reference guidance renders its scene every step)."""
        if not self.config.render.fixed_capacity:
            return []
        found = (getattr(self.stage, "renderer", None), getattr(self.guidance, "renderer", None))
        return [r for r in found if isinstance(r, Renderer)]

    def _rng_snapshot(self) -> Dict[str, Any]:
        """Every random state the step draws from (host copies: no host sync), to redo a step exactly."""
        snap = {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state(),
                "guidance": {key: gen.get_state() for key, gen in self._guidance_generators().items()}}
        shading_rng = getattr(self.stage, "shading_rng", None)
        if shading_rng is not None:
            snap["shading"] = shading_rng.getstate()
        return snap

    def _rng_restore(self, snap: Dict[str, Any]) -> None:
        self.generator.set_state(snap["generator"])
        torch.set_rng_state(snap["torch_cpu"])
        for key, gen in self._guidance_generators().items():
            gen.set_state(snap["guidance"][key])
        if "shading" in snap:
            self.stage.shading_rng.setstate(snap["shading"])

    def train_step(self, step: int) -> Dict[str, Any]:
        """One step at global step `step` of the current stage (which counts its steps from its own start).
        With fixed-capacity sample buffers (render.fixed_capacity) the renders have static shapes
        and the step's only host sync is the readback of its loss, terms, finiteness and sample totals; a step
        whose samples overflowed a buffer takes no optimizer step, the buffers grow and the step is redone from
        the same random state."""
        renderers = self.sample_buffer_renderers()
        if not renderers:
            return self._train_step(step, [])
        snap = self._rng_snapshot() if self.MAX_REDOS > 0 else None
        for attempt in range(self.MAX_REDOS + 1):
            with contextlib.ExitStack() as stack:
                buffers = [stack.enter_context(r.fixed_capacity()) for r in renderers]
                result = self._train_step(step, buffers, last_try=attempt == self.MAX_REDOS)
            if not result.pop("overflow"):
                break
            self._rng_restore(snap)
        return result

    def _train_step(self, step: int, buffers: List[SampleBuffer], last_try: bool = True) -> Dict[str, Any]:
        cfg = self.config
        step = step - self.stage_start()
        progress = step / max(self.stage.n_steps(cfg), 1)
        plan = self.stage.plan(step, progress)
        # the progressive view range widens during the first stage; later ones start from a whole object
        view_progress = progress if self.stage_index == 0 else 1.0
        weights = plan.weight_vector(self.device)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        capture = self._step_capture(plan, buffers)
        if capture is not None:
            key = self.step_key(plan, progress, view_progress, buffers)
            readback, names, info, counted, metrics = capture.run(
                key, weights, lambda w: self._forward_backward(step, progress, view_progress, plan, w, buffers), params)
            metrics = {k: v.clone() for k, v in metrics.items()}  # the next replay overwrites the graph's outputs
            self.guidance_calls_replayed()
        else:
            self._drop_gradients(params)
            readback, names, info, counted, metrics = self._forward_backward(step, progress, view_progress, plan, weights,
                                                                             buffers)
        params = [p for p in params if p.grad is not None]
        values = readback.tolist()  # the loss, the non-finite flag, the terms, then the buffers' totals
        values, totals = values[:len(names) + 2], values[len(names) + 2:]
        overflow = False
        for buf, has_totals in zip(buffers, counted):
            if has_totals:
                overflow |= buf.settle(totals[:2])
                totals = totals[2:]
        if overflow and not last_try:  # samples were cut short: no update; train_step redoes the step
            self._drop_gradients(params)
            return {"overflow": True}
        finite = values[1] == 0
        if finite:
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            self.optimizer.step()
        self._drop_gradients(params)
        self.stage.after_step(step, self.generator)
        # Device values for metrics.jsonl: read back in one go every output.metrics_every steps, not here.
        return {"loss": values[0], "finite": finite, **info, "terms": dict(zip(names, values[2:])),
                "metrics": metrics, "overflow": False}

    @staticmethod
    def _drop_gradients(params: List[torch.Tensor]) -> None:
        """optimizer.zero_grad(set_to_none=True) without its profiler range (two ops per call)."""
        for p in params:
            p.grad = None

    def _forward_backward(self, step: int, progress: float, view_progress: float, plan, weights: torch.Tensor,
                          buffers: List[SampleBuffer]):
        """The step's device work, from the cameras to the gradients: what `fastdream.step_capture` captures.
        Returns (one tensor to read back: loss, non-finite flag, terms, the buffers' totals; the term names; what the
        loop reports; which buffers recorded totals; the metrics' device scalars). Everything the host decides
        is in `plan` (and the step's key)."""
        width, height = self.stage.image_size()
        cams = sample_cameras(self.config.batch_size, width, height, self.stage.scene_radius, self.config.camera,
                              generator=self.generator, device=self.device, progress=view_progress)
        result = self.stage.loss(cams, step, progress, self.guidance, self.generator, plan=plan.bind(weights))
        loss, terms = result.loss, result.terms
        vector_names, vector = result.term_vector
        # Backward runs even on a non-finite loss (its gradients are then non-finite too) so that the
        # whole step needs one host sync: the loss, its terms and the finiteness verdict come back together.
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        pending = [buf.take() for buf in buffers]
        with torch.no_grad():  # the readback carries no gradient: no detach per term
            loss_value = loss.float()  # (the check below "unscales" it in place, by exactly 1)
            # one op checks the loss and every gradient (GradScaler's check, at scale 1) instead of three per tensor
            nonfinite = loss_value.new_zeros(())
            torch._amp_foreach_non_finite_check_and_unscale_([loss_value, *(p.grad for p in params)], nonfinite,
                                                             self._unit_scale)
            head = torch.stack([loss_value, nonfinite, *(v.float() for v in terms.values())])
            # cat promotes the integer sample totals to float32 (exact below 2^24)
            readback = torch.cat([head, *([] if vector is None else [vector]), *(p for p in pending if p is not None)])
        metrics = dict(result.metrics)  # the loss and its terms come back with the readback: none here
        return (readback, [*terms, *vector_names], dict(result.info), [p is not None for p in pending], metrics)

    def step_key(self, plan, progress: float, view_progress: float, buffers: List[SampleBuffer]) -> tuple:
        """Every host value the step's device work depends on: steps with equal keys dispatch the same ops on
        the same shapes, so one captured graph serves them all."""
        return (self.stage_index, plan.key, self.guidance.step_key(progress), view_ranges(self.config.camera, view_progress),
                tuple(b.capacities() for b in buffers))

    def _build_capture(self) -> Optional[StepCapture]:
        if not self.config.cuda_graph:
            return None
        if self.device.type != "cuda":
            log.info("fastdream: cuda_graph applies to CUDA runs; this %s run steps eagerly.", self.device.type)
            return None
        return StepCapture([self.generator, *self._guidance_generators().values()])

    def _step_capture(self, plan, buffers: List[SampleBuffer]):
        """The step's graph capture, when this step can be replayed from a graph (see fastdream.step_capture)."""
        if self.capture is None or not plan.capturable or not buffers:
            return None
        if not all(b.calibrated for b in buffers):
            return None
        return self.capture

    def guidance_calls_replayed(self) -> None:
        """The host bookkeeping of the guidance call a replayed step made (its periodic non-finite report)."""
        count = getattr(self.guidance, "count_call", None)
        if count is not None:
            count()

    # ------------------------------------------------------------------ loop
    def _install_stop_handlers(self) -> Dict[int, Any]:
        """SIGINT (Ctrl-C) and SIGTERM (schedulers, `timeout`, Ray) ask the loop to stop at the next step boundary
        and save; a second one stops at once (see train()). Returns the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_requested:  # a second signal: stop right now
                raise KeyboardInterrupt
            self._stop_requested = True
            self.stop_signal = name
            again = "Ctrl-C" if signum == signal.SIGINT else name
            print(f"\nfastdream: {name} received: stopping after this step and saving a checkpoint ({again} again to "
                  "stop at once, without saving)", file=sys.stderr, flush=True)

        previous = {}
        for signum in STOP_SIGNALS:
            try:
                previous[signum] = signal.signal(signum, handler)
            except ValueError:
                pass
        return previous

    def preview(self) -> Path:
        return self.stage.preview(self.out_dir / "previews" / f"step_{self.step:05d}.png", self.config.output)

    def train(self) -> bool:
        """Run every stage of config.stages to its end. Returns False when stopped by a signal: after one, at the next step boundary with
        a checkpoint (saved_on_stop); after a second one, at once and without writing anything."""
        from .metrics_log import MetricsLog
        from .progress import progress

        cfg = self.config
        total = self.total_steps
        bar = progress(total, "fastdream", every=cfg.output.log_every if cfg.output.log_every > 0 else None,
                       initial=self.step, quiet=self.quiet, line_desc="step")
        metrics_log = MetricsLog(self.out_dir, cfg.output.metrics_every, cfg.output.tensorboard,
                                 resume_step=self.step if self.step > 0 else None)
        previous = self._install_stop_handlers()
        try:
            while self.step < total:
                if self._stop_requested:
                    raise KeyboardInterrupt
                if self.step >= self.stage_end:
                    self.next_stage()
                t_step = time.perf_counter()
                self._in_step = True
                result = self.train_step(self.step)
                self.step += 1
                self.train_time += time.perf_counter() - t_step
                if result["finite"]:
                    self.consecutive_nonfinite = 0
                    self.last_loss = result["loss"]
                else:
                    self.n_skipped += 1
                    self.consecutive_nonfinite += 1
                    log.warning("fastdream: step %d: non-finite loss or gradients; step skipped (%d in a row, %d in all)",
                                self.step, self.consecutive_nonfinite, self.n_skipped)
                    if self.consecutive_nonfinite >= cfg.max_nonfinite_steps:
                        kept = (f"The last good checkpoint is kept: {self.last_checkpoint}" if self.last_checkpoint
                                else "No checkpoint had been written yet.")
                        raise FastDreamError(
                            f"The loss was not finite for {self.consecutive_nonfinite} steps in a row (up to step "
                            f"{self.step}); stopping. {kept} Lower the learning rates (--set optim.lr_hash=..., "
                            "optim.lr_mlp=...), the guidance scale, or use float32 guidance (--set guidance.dtype=float32), "
                            "then continue with --resume.")
                self._in_step = False  # parameters, optimizer, grid, random state and counters agree on self.step
                row = {"step": self.step, "stage": self.stage.name, "time": round(self.train_time, 4),
                       "skipped": self.n_skipped}
                row.update({k: result[k] for k in ("shading", "samples_per_ray") if k in result})
                losses = {"loss": result["loss"], **{f"loss_{k}": v for k, v in result["terms"].items()}}
                row.update({k: v if math.isfinite(v) else None for k, v in losses.items()})
                metrics_log.record(row, result["metrics"])
                if self.step % 5 == 0 or self.step == total:
                    bar.set_postfix(loss=f"{self.last_loss:.4g}", skipped=self.n_skipped, refresh=False)
                bar.update(1)
                o = cfg.output
                if o.preview_every > 0 and self.step % o.preview_every == 0 and self.step < total:
                    metrics_log.flush()  # a live view shows the curve up to the new preview
                    self.preview()
                if (o.checkpoint_every > 0 and self.step % o.checkpoint_every == 0 and self.step < total
                        and self.consecutive_nonfinite == 0):  # never checkpoint in the middle of a non-finite streak
                    self.save()
                _on_step(self, self.step)
        except KeyboardInterrupt:
            bar.close()
            if self.stop_signal is None:
                self.stop_signal = "SIGINT"
            # Stopped part-way through a step (a second signal), the parameters, Adam moments and random
            # generators are half-way into the next step: a checkpoint of them would resume a different run.
            if not self._in_step:
                self.save()
                self.saved_on_stop = True
            return False
        finally:
            bar.close()
            metrics_log.close()  # the rows of completed steps
            for signum, handler in previous.items():
                if handler is not None:
                    signal.signal(signum, handler)
        return True
