"""`fastdream run PROMPT`: the DreamFusion training loop, and `fastdream export DIR`.

Each step: sample cameras and a point light (DreamFusion's ranges), pick the shading mode (albedo
only for the first `shading.albedo_only_fraction` of the run, then random), render at 64x64, score the
renders with SDS guidance (view-dependent prompts are the guidance's job: it gets the cameras), add
the orientation loss and the opacity regulariser, take an Adam step (hash table at a higher learning
rate than the MLPs) and, every `grid.update_every` steps, update the occupancy grid.

Outputs (DIR defaults to outputs/<prompt slug>): config.yaml, previews/step_XXXXX.png,
checkpoints/step_XXXXXXX.pt (atomic), and at the end mesh.obj/.mtl/.ply/.glb, turntable.mp4,
turntable_textureless.mp4 and metrics.json. `--resume` continues exactly where the last checkpoint
left off (parameters, Adam moments, occupancy grid, step and every random generator), so a resumed run
equals an uninterrupted one (given the same --steps: the shading and timestep schedules follow the total,
and a changed total is warned about). Ctrl-C or SIGTERM writes a checkpoint at the last completed step and
exits (130 / 143); a second signal stops at once without writing, keeping the last checkpoint.

Randomness: one torch.Generator on the training device (seed) drives cameras, lights, shading choices
and occupancy-grid updates; the guidance draws t and noise from its own generator (seed + 1); the
parameters are initialised from torch's global generator seeded with `seed`. Same seed, config and
device => same result.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import __version__, _backend, atomic
from .atomic import remove_stale_temporaries
from .cameras import sample_cameras
from .checkpoint import checkpoint_name, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import RunConfig, apply_overrides, build_config, config_from_dict, config_to_dict, save_config
from .errors import FastDreamError
from .output_folder import check_output_folder, clear_outputs, is_nonempty, remove_if_created
from .regularizers import opacity_entropy, opacity_sparsity, orientation_loss

log = logging.getLogger("fastdream")

CHECKPOINT_KIND = "run"
SHADINGS = ("albedo", "lambertian", "textureless")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal number, as a shell reports them
OUTPUT_NAMES = ("checkpoints", "previews", "config.yaml", "metrics.json", "mesh.obj", "mesh.mtl", "mesh.ply",
                "mesh.glb", "mesh_albedo.png", "turntable.mp4", "turntable.gif", "turntable_textureless.mp4",
                "turntable_textureless.gif")


def _on_step(trainer: "Trainer", step: int) -> None:
    """Called after every completed step (tests patch it to interrupt a run)."""


def slugify(prompt: str, max_len: int = 60) -> str:
    """The default output folder name: the prompt's ASCII words joined by "_". A prompt with characters the
    slug cannot show (any non-ASCII, or no letters at all) also gets 8 hex digits of its SHA-1, so that
    "一只猫" and "一只狗" do not share a folder."""
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:max_len].rstrip("_")
    if slug and prompt.isascii():
        return slug
    return f"{slug or 'run'}_{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"


def resolve_device(name: str) -> torch.device:
    if name in ("", "auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise FastDreamError(f"Unknown device {name!r}; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastDreamError(f"--device {name} was asked for but CUDA is not available on this machine (or in this "
                             "PyTorch build); use --device cpu.")
    return device


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


OOM_KNOBS = ("Reduce memory with: --set batch_size=1; smaller renders (--set width=64 --set height=64); fewer "
             "samples per ray (--set render.samples_per_ray=256); a smaller hash table (--set field.log2_hashmap_size=17); "
             "fewer rays per chunk for previews/export (--set render.chunk_rays=8192, --mesh-resolution 128); for Stable "
             "Diffusion guidance --set guidance.options.latent_mode=linear or guidance.dtype=float16; or --device cpu.")


# ---------------------------------------------------------------------------------------------- building

def build_run_renderer(config: RunConfig, device: torch.device):
    from .renderer import build_renderer

    grid_kwargs = dict(ema_decay=config.grid.ema_decay, threshold=config.grid.threshold, warmup_steps=config.grid.warmup_steps)
    renderer = build_renderer(aabb=config.aabb, field_config=config.field, render_config=config.render,
                              background=config.background, background_color=config.background_color,
                              grid_resolution=config.grid.resolution, grid_kwargs=grid_kwargs)
    return renderer.to(device)


def build_optimizer(renderer, config: RunConfig) -> torch.optim.Adam:
    o = config.optim
    groups = [{"params": [renderer.field.encoding_params], "lr": o.lr_hash, "name": "hash"},
              {"params": list(renderer.field.mlp_parameters()), "lr": o.lr_mlp, "name": "mlp"}]
    bg = [p for p in renderer.background.parameters() if p.requires_grad]
    if bg:
        groups.append({"params": bg, "lr": o.lr_background, "name": "background"})
    return torch.optim.Adam(groups, betas=tuple(o.betas), eps=o.eps)


def build_guidance(config: RunConfig, device: torch.device):
    g = config.guidance
    options = dict(guidance_scale=g.guidance_scale, t_min=g.t_min, t_max=g.t_max, weighting=g.weighting,
                   negative_prompt=g.negative_prompt, seed=config.seed + 1)
    options.update(g.options)
    if g.kind == "reference":
        from .guidance.base import GuidanceOptions
        from .guidance.reference import ReferenceSceneGuidance

        options.setdefault("view_dependent", False)
        opts = GuidanceOptions.from_kwargs(None, **options)
        guidance = ReferenceSceneGuidance(g.reference_scene, device, options=opts, render_config=config.render,
                                          grid_resolution=config.grid.resolution,
                                          background_color=config.background_color,
                                          resolution=g.reference_resolution)
    else:
        from .guidance import load_guidance

        guidance = load_guidance(config.model, device, dtype=g.dtype or None, **options)
    guidance.set_prompt(config.prompt, g.negative_prompt)
    return guidance


def prepare_reference(config: RunConfig) -> None:
    """Reference guidance: the field lives in the scene's box and sees the scene's fixed background."""
    from .guidance.reference import load_reference_scene

    scene = load_reference_scene(config.guidance.reference_scene, config.guidance.reference_resolution)
    config.aabb = tuple(float(v) for v in scene["aabb"])
    if config.background != "fixed":
        log.info("fastdream: reference guidance renders the scene over a fixed background; using background=fixed.")
        config.background = "fixed"


# ---------------------------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, config: RunConfig, out_dir, quiet: bool = False, device: Optional[torch.device] = None):
        self.config = config.validate()
        self.out_dir = Path(out_dir)
        self.quiet = quiet
        self.device = device or resolve_device(config.device)
        torch.manual_seed(config.seed)  # parameter initialisation
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(config.seed)
        self.renderer = build_run_renderer(config, self.device)
        self.renderer.train()
        self.optimizer = build_optimizer(self.renderer, config)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.guidance = build_guidance(config, self.device)
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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        rng = {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
        gen = getattr(self.guidance, "generator", None)
        if isinstance(gen, torch.Generator):
            rng["guidance"] = gen.get_state()
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"kind": CHECKPOINT_KIND, "step": self.step, "config": config_to_dict(self.config),
                "aabb": list(self.config.aabb), "renderer": self.renderer.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng, "n_skipped": self.n_skipped,
                "consecutive_nonfinite": self.consecutive_nonfinite, "train_time": self.train_time,
                "versions": versions(self.device)}

    def load_state_dict(self, state: Dict[str, Any], source: str = "checkpoint") -> None:
        try:
            self.renderer.load_state_dict(state["renderer"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FastDreamError(f"Checkpoint {source} does not fit this configuration ({first}). It was written with "
                                 "other field/grid settings; resume without changing them, or start over with --force.") from None
        rng = state.get("rng", {})
        if "generator" in rng:
            self.generator.set_state(rng["generator"].cpu() if self.device.type == "cpu" else rng["generator"])
        if "torch_cpu" in rng:
            torch.set_rng_state(rng["torch_cpu"])
        gen = getattr(self.guidance, "generator", None)
        if "guidance" in rng and isinstance(gen, torch.Generator):
            gen.set_state(rng["guidance"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])
        self.n_skipped = int(state.get("n_skipped", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.train_time = float(state.get("train_time", 0.0))

    def check_finite_parameters(self) -> None:
        """Raise (before anything is written) when a parameter went NaN/inf: such a model must not replace a good checkpoint."""
        params = list(self.renderer.parameters())
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
    def choose_shading(self, step: int) -> str:
        s = self.config.shading
        u = float(torch.rand((), generator=self.generator, device=self.device))
        if step < s.albedo_only_fraction * self.config.steps:
            return "albedo"
        probs = torch.tensor([s.albedo, s.lambertian, s.textureless], dtype=torch.float64)
        cdf = torch.cumsum(probs / probs.sum(), 0)
        return SHADINGS[min(int((cdf <= u).sum()), 2)]

    def train_step(self, step: int) -> Dict[str, Any]:
        cfg = self.config
        field = self.renderer.field
        cams = sample_cameras(cfg.batch_size, cfg.width, cfg.height, field.scene_radius, cfg.camera,
                              generator=self.generator, device=self.device)
        shading = self.choose_shading(step)
        out = self.renderer.render(cams, shading=shading, need_normals=shading != "albedo")
        images = out.rgb.permute(0, 3, 1, 2)
        progress = step / max(cfg.steps, 1)
        sds = self.guidance(images, cams, shading, progress)
        loss = sds.loss
        terms = {"sds": sds.loss.detach()}
        rays = out.rays
        if cfg.reg.orientation > 0 and rays is not None and rays.sample_normals is not None:
            orient = orientation_loss(rays.weights, rays.sample_normals, rays.directions, rays.ray_indices)
            loss = loss + cfg.reg.orientation * orient
            terms["orient"] = orient.detach()
        opacity = out.opacity.reshape(-1)
        if cfg.reg.opacity_entropy > 0:
            ent = opacity_entropy(opacity)
            loss = loss + cfg.reg.opacity_entropy * ent
            terms["entropy"] = ent.detach()
        if cfg.reg.opacity_sparsity > 0:
            sp = opacity_sparsity(opacity)
            loss = loss + cfg.reg.opacity_sparsity * sp
            terms["sparsity"] = sp.detach()
        self.optimizer.zero_grad(set_to_none=True)
        # Backward runs even on a non-finite loss (its gradients are then non-finite too) so that the
        # whole step needs one host sync: the loss, its terms and the finiteness verdict come back together.
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads_finite = torch.stack([torch.isfinite(p.grad).all() for p in params]).all() if params else loss.new_ones((), dtype=torch.bool)
        finite_t = torch.isfinite(loss) & grads_finite
        values = torch.stack([v.float() for v in (loss.detach(), *terms.values(), finite_t)]).tolist()
        finite = bool(values[-1])
        if finite:
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.grid.update_every == 0:
            step_size = self.renderer.step_size
            self.renderer.grid.update(step, lambda x: field.density(x) * step_size, generator=self.generator)
        return {"loss": values[0], "finite": finite, "shading": shading, "n_samples": out.n_samples,
                "terms": dict(zip(terms, values[1:-1]))}

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
        from .export import write_preview

        o = self.config.output
        return write_preview(self.renderer, self.out_dir / "previews" / f"step_{self.step:05d}.png", o.preview_views,
                             o.preview_resolution, o.video_elevation, self._view_distance(), o.view_fov)

    def _view_distance(self) -> float:
        from .export import view_distance

        return view_distance(self.renderer.field.scene_radius, self.config.output)

    def train(self) -> bool:
        """Run until config.steps. Returns False when stopped by a signal: after one, at the next step boundary with
        a checkpoint (saved_on_stop); after a second one, at once and without writing anything."""
        from tqdm import tqdm

        cfg = self.config
        total = cfg.steps
        bar = tqdm(total=total, initial=self.step, disable=self.quiet, dynamic_ncols=True, unit="it",
                   desc="fastdream", file=sys.stderr, smoothing=0.1)
        previous = self._install_stop_handlers()
        start_step, t0 = self.step, time.perf_counter()
        try:
            while self.step < total:
                if self._stop_requested:
                    raise KeyboardInterrupt
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
                bar.update(1)
                if not self.quiet and (self.step % 5 == 0 or self.step == total):
                    bar.set_postfix(loss=f"{self.last_loss:.4g}", skipped=self.n_skipped, refresh=False)
                if self.quiet and cfg.output.log_every > 0 and (self.step % cfg.output.log_every == 0 or self.step == total):
                    now = time.perf_counter()
                    rate = (self.step - start_step) / max(now - t0, 1e-9)
                    eta = (total - self.step) / max(rate, 1e-9)
                    log.info("step %d/%d  loss %.4g  %.2f it/s  ETA %s  skipped %d", self.step, total, self.last_loss,
                             rate, time.strftime("%H:%M:%S", time.gmtime(eta)), self.n_skipped)
                o = cfg.output
                if o.preview_every > 0 and self.step % o.preview_every == 0 and self.step < total:
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
            for signum, handler in previous.items():
                if handler is not None:
                    signal.signal(signum, handler)
        return True


# ---------------------------------------------------------------------------------------------- metrics

def versions(device) -> Dict[str, Any]:
    from . import _backend

    out = {"fastdream": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        out["backend"] = _backend.backend_name(device)
    except Exception:  # a broken native build must not break a checkpoint
        out["backend"] = "unknown"
    for name in ("numpy", "diffusers", "transformers", "trimesh", "mcubes"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "unknown")
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def peak_memory(device: torch.device) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if device.type == "cuda":
        out["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        out["peak_host_memory_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        pass
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------- commands

def run(prompt: str, out_dir=None, config: Optional[RunConfig] = None, overrides: Optional[List[str]] = None,
        config_file=None, resume: bool = False, force: bool = False, quiet: bool = False,
        cli: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The `run` command as a function. Returns a summary dict (also written as metrics.json).

    cli: values of dedicated flags (steps, seed, device, guidance kind, model, reference scene), applied last.
    """
    wall0 = time.perf_counter()
    if not isinstance(prompt, str) or not prompt.strip():
        raise FastDreamError("The prompt is empty: describe the object to create, e.g. "
                             "fastdream run \"a vase with pink flowers\".")
    prompt = prompt.strip()
    if resume and force:
        raise FastDreamError("--resume and --force contradict each other: --resume continues the run in the output "
                             "folder, --force deletes it and starts over. Pass one.")
    out_dir = Path(out_dir) if out_dir else Path("outputs") / slugify(prompt)
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    # Everything a user can get wrong is checked here, before any model loads (minutes with real SD).
    _backend.requested_backend()
    check_output_folder(out_dir)

    state = None
    if is_nonempty(out_dir) and not (resume or force):
        raise FastDreamError(f"The output folder {out_dir} already exists and is not empty. Pass --resume to continue "
                             "its run from the last checkpoint, --force to start over (deleting its fastdream outputs), "
                             "or --out to choose another folder.")
    if resume and is_nonempty(out_dir):
        removed = remove_stale_temporaries([out_dir, out_dir / "checkpoints", out_dir / "previews"])
        if removed:
            log.info("fastdream: removed %d temporary file(s) left by an interrupted write in %s", removed, out_dir)
        ckpt = latest_checkpoint(out_dir / "checkpoints")
        if ckpt is None:
            raise FastDreamError(f"Nothing to resume in {out_dir}: it has no checkpoints/step_*.pt. Start over with --force.")
        state = load_checkpoint(ckpt, kind=CHECKPOINT_KIND)
        base = config_from_dict(state["config"])
        base = build_config(config_file, overrides or [], base)
        log.info("fastdream: resuming %s from step %d", out_dir, int(state["step"]))
    elif resume:
        log.info("fastdream: nothing to resume in %s; starting a new run.", out_dir)
    if state is None:
        base = build_config(config_file, overrides or [], config)
    config = base
    _apply_cli(config, cli)
    config.prompt = prompt if state is None else (config.prompt or prompt)
    if state is not None and config.prompt != prompt:
        log.warning("fastdream: the run in %s was for %r; continuing it (the prompt given now, %r, is ignored).",
                    out_dir, config.prompt, prompt)
    if state is not None:
        _warn_schedule_change(state, config)
    config.validate()
    if config.guidance.kind == "reference" and state is None:
        prepare_reference(config)
        config.validate()
    device = resolve_device(config.device)
    _backend.use_native(device)  # FASTDREAM_BACKEND=native without a usable extension fails here, not in step 1
    existed_before = out_dir.exists()
    trainer = None

    try:
        trainer = Trainer(config, out_dir, quiet=quiet, device=device)
        if force and out_dir.exists():  # only once the model loaded: a typo in --model must not cost the old run
            clear_outputs(out_dir, OUTPUT_NAMES)
        if state is not None:
            trainer.load_state_dict(state, str(ckpt))
            trainer.last_checkpoint = ckpt
        save_config(config, out_dir / "config.yaml")
        if not quiet:
            log.info("fastdream: %r -> %s (%d steps on %s, guidance %s)", prompt, out_dir, config.steps, device,
                     config.guidance.kind if config.guidance.kind == "reference" else config.model)
        steps_before = trainer.step
        time_before = trainer.train_time
        completed = trainer.train()
        if not completed:
            return {"interrupted": True, "signal": trainer.stop_signal, "step": trainer.step,
                    "checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
                    "saved": trainer.saved_on_stop}
        trainer.check_finite_parameters()
        if trainer.last_checkpoint is None or trainer.last_checkpoint.name != checkpoint_name(trainer.step):
            trainer.save()
        trainer.preview()
        outputs = {}
        from .export import export_outputs

        outputs = export_outputs(trainer.renderer, out_dir, config.output, log.info)
    except BaseException as exc:
        if trainer is None or trainer.step == 0:  # failed before its first step: nothing worth keeping was written
            remove_if_created(out_dir, existed_before)
        if isinstance(exc, RuntimeError) and _is_oom(exc):
            first = str(exc).strip().splitlines()[0]
            raise FastDreamError(f"Out of memory on {device} ({first}). {OOM_KNOBS}") from None
        raise
    steps_run = trainer.step - steps_before
    run_time = trainer.train_time - time_before
    metrics = {
        "prompt": prompt, "steps": trainer.step, "steps_this_session": steps_run,
        "wall_time_s": round(time.perf_counter() - wall0, 3), "train_time_s": round(trainer.train_time, 3),
        "it_per_s": round(steps_run / run_time, 3) if run_time > 0 else None,
        "n_skipped": trainer.n_skipped, "final_loss": trainer.last_loss if math.isfinite(trainer.last_loss) else None,
        "device": device_name(device), **peak_memory(device), "versions": versions(device),
        "guidance": config.guidance.kind if config.guidance.kind == "reference" else config.model,
        "seed": config.seed, "outputs": {k: os.path.relpath(v, out_dir) for k, v in outputs.items()},
        "checkpoint": os.path.relpath(trainer.last_checkpoint, out_dir) if trainer.last_checkpoint else None,
    }
    atomic.write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    speed = f"{metrics['it_per_s']} it/s" if metrics["it_per_s"] else "no training step this time: outputs re-exported"
    log.info("fastdream: done in %.1fs (%s); outputs in %s", metrics["wall_time_s"], speed, out_dir)
    metrics["trainer"] = trainer
    return metrics


def _warn_schedule_change(state: Dict[str, Any], config: RunConfig) -> None:
    """Resuming with another --steps: the schedules that follow progress = step / steps change from here on."""
    before = int((state.get("config") or {}).get("steps", config.steps))
    if before != config.steps:
        log.warning("fastdream: this run was set up for %d steps and now runs to %d. The schedules that depend on the "
                    "total (the albedo-only phase, the guidance's timestep range and annealing) follow the new total "
                    "from step %d on, so the result will differ from a straight %d-step run.",
                    before, config.steps, int(state["step"]) + 1, config.steps)


def _apply_cli(config: RunConfig, cli: Dict[str, Any]) -> None:
    if "steps" in cli:
        config.steps = int(cli["steps"])
    if "seed" in cli:
        config.seed = int(cli["seed"])
    if "device" in cli:
        config.device = cli["device"]
    if "guidance" in cli:
        config.guidance.kind = cli["guidance"]
    if "model" in cli:
        config.guidance.model = str(cli["model"])
    if "reference_scene" in cli:
        config.guidance.reference_scene = str(cli["reference_scene"])
        if "guidance" not in cli:
            config.guidance.kind = "reference"


def export(out_dir, checkpoint=None, device: Optional[str] = None, overrides: Optional[List[str]] = None,
           **output_overrides) -> Dict[str, str]:
    """Redo a run's outputs (mesh, turntables, preview) from its latest (or a given) checkpoint."""
    from .export import export_outputs

    out_dir = Path(out_dir)
    if checkpoint is None:
        if not out_dir.is_dir():
            raise FastDreamError(f"{out_dir} is not a folder; pass the output folder of a `fastdream run`.")
        checkpoint = latest_checkpoint(out_dir / "checkpoints")
        if checkpoint is None:
            raise FastDreamError(f"{out_dir} has no checkpoints/step_*.pt to export from.")
    state = load_checkpoint(checkpoint, kind=CHECKPOINT_KIND)
    config = config_from_dict(state["config"])
    config = apply_overrides(config, overrides or [])
    for key, value in output_overrides.items():
        if value is not None:
            setattr(config.output, key, value)
    config.validate()
    dev = resolve_device(device or config.device)
    renderer = build_run_renderer(config, dev)
    try:
        renderer.load_state_dict(state["renderer"])
    except (RuntimeError, KeyError) as exc:
        raise FastDreamError(f"Checkpoint {checkpoint} does not match its own configuration ({str(exc).splitlines()[0]}).") from None
    renderer.eval()
    log.info("fastdream: exporting %s (step %d)", checkpoint, int(state["step"]))
    return export_outputs(renderer, out_dir, config.output, log.info)


def _cmd_run(args) -> int:
    if not args.quiet:
        logging.getLogger("fastdream").setLevel(logging.INFO)
    cli = {"steps": args.steps, "seed": args.seed, "device": args.device, "guidance": args.guidance,
           "model": args.model, "reference_scene": args.reference_scene}
    result = run(args.prompt, args.out, overrides=args.set or [], config_file=args.config, resume=args.resume,
                 force=args.force, quiet=args.quiet, cli=cli)
    if result.get("interrupted"):
        sig = result.get("signal") or "SIGINT"
        if result.get("saved"):
            what = f"at step {result['step']}; checkpoint {result['checkpoint']} saved"
        else:
            kept = f"the last checkpoint, {result['checkpoint']}, is kept" if result.get("checkpoint") else "no checkpoint yet"
            what = (f"during step {result['step'] + 1}; nothing saved (a half-done step would not resume exactly), "
                    f"{kept}")
        hint = " Continue with --resume." if result.get("checkpoint") else ""
        print(f"fastdream run: stopped by {sig} {what}.{hint}", file=sys.stderr)
        return EXIT_CODES.get(sig, 130)
    return 0


def _cmd_export(args) -> int:
    overrides = dict(mesh_resolution=args.mesh_resolution, mesh_threshold=args.threshold, video_frames=args.video_frames,
                     video_resolution=args.video_resolution)
    if args.no_video:
        overrides["video"] = False
    if args.no_mesh:
        overrides["mesh"] = False
    if args.texture:
        overrides["texture"] = True
    written = export(args.dir, checkpoint=args.checkpoint, device=args.device, overrides=args.set or [], **overrides)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="text to 3D: optimise a radiance field with SDS, then export a mesh and turntable videos",
        description="Optimise a hash-grid radiance field from a text prompt with Score Distillation Sampling "
                    "(DreamFusion), then write mesh.obj/.ply/.glb, turntable videos and metrics.json.")
    p.add_argument("prompt", help="what to create, e.g. \"a vase with pink flowers\"")
    p.add_argument("--out", help="output folder (default outputs/<prompt slug>)")
    p.add_argument("--model", help="diffusion model: hub id or local diffusers folder (default per --guidance)")
    p.add_argument("--steps", type=int, help="optimisation steps (default 10000)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--config", help="YAML file with configuration keys (see DIR/config.yaml of any run)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a configuration key, dotted for sections (e.g. --set optim.lr_hash=0.02); repeatable")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last checkpoint")
    p.add_argument("--force", action="store_true", help="start over in a non-empty output folder (deletes its fastdream outputs)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--guidance", choices=("sd", "if", "reference"),
                   help="Stable Diffusion (default), DeepFloyd IF, or a reference scene (exact denoiser, no model)")
    p.add_argument("--reference-scene", dest="reference_scene",
                   help="with --guidance reference: an .npz voxel scene (density, albedo, aabb) or a mesh")
    p.add_argument("--quiet", action="store_true", help="no progress bar; a log line every output.log_every steps")
    p.set_defaults(func=_cmd_run)

    e = subparsers.add_parser("export", help="redo a run's mesh and turntable videos from its latest checkpoint",
                              description="Re-export mesh.obj/.ply/.glb and turntables from a run folder's checkpoint.")
    e.add_argument("dir", help="output folder of a `fastdream run`")
    e.add_argument("--checkpoint", help="a specific checkpoint file (default: the latest in DIR/checkpoints)")
    e.add_argument("--mesh-resolution", type=int, dest="mesh_resolution", help="marching-cubes lattice size (default 256)")
    e.add_argument("--threshold", type=float, help="density iso-level of the surface (default 10)")
    e.add_argument("--video-frames", type=int, dest="video_frames", help="frames per turntable (default 120)")
    e.add_argument("--video-resolution", type=int, dest="video_resolution", help="turntable size in pixels (default 256)")
    e.add_argument("--texture", action="store_true", help="also bake a UV texture (needs xatlas)")
    e.add_argument("--no-video", action="store_true", dest="no_video", help="skip the turntables")
    e.add_argument("--no-mesh", action="store_true", dest="no_mesh", help="skip the mesh")
    e.add_argument("--device", help="cuda or cpu")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a configuration key (e.g. output.video_fps=24)")
    e.set_defaults(func=_cmd_export)
