"""A run folder: making, resuming and clearing it, running a stage in it, and loading it back.

`run()` is `fastdream run PROMPT` as a function: it resolves the configuration (defaults < YAML file <
--set < dedicated flags; on --resume the run's own stored configuration is the base), applies the
folder policy (an existing non-empty folder needs --resume or --force; --force deletes only what
fastdream wrote), trains with `fastdream.train.Trainer` and exports.

Outputs (DIR defaults to outputs/<prompt slug>): config.yaml, previews/step_XXXXX.png,
checkpoints/step_XXXXXXX.pt (atomic), and at the end mesh.obj/.mtl/.ply/.glb, turntable.mp4,
turntable_textureless.mp4 and metrics.json. `--resume` continues exactly where the last checkpoint
left off (parameters, Adam moments, occupancy grid, step and every random generator), so a resumed run
equals an uninterrupted one (given the same --steps: the shading and timestep schedules follow the total,
and a changed total is warned about). Ctrl-C or SIGTERM writes a checkpoint at the last completed step and
exits (130 / 143); a second signal stops at once without writing, keeping the last checkpoint.

`load_run()` is the one way back from a folder to a trained stage (config + checkpoint + modules),
used by `export()`, `fastdream eval` and anyone else reading finished runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import _backend, atomic
from ._backend import use_backend
from .atomic import remove_stale_temporaries
from .checkpoint import checkpoint_name, latest_checkpoint, load_checkpoint
from .config import RunConfig, apply_overrides, build_config, config_from_dict, save_config
from .errors import FastDreamError
from .guidance import registry as guidance_registry
from .output_folder import check_output_folder, clear_outputs, is_nonempty, remove_if_created
from .runtime import device_name, is_oom, peak_memory, resolve_device, versions
from .stages import Stage, build_stage
from .train import CHECKPOINT_KIND, Trainer

log = logging.getLogger("fastdream")

OUTPUT_NAMES = ("checkpoints", "previews", "config.yaml", "metrics.json", "mesh.obj", "mesh.mtl", "mesh.ply",
                "mesh.glb", "mesh_albedo.png", "turntable.mp4", "turntable.gif", "turntable_textureless.mp4",
                "turntable_textureless.gif", "metrics.jsonl", "report.html", "tensorboard")


def slugify(prompt: str, max_len: int = 60) -> str:
    """The default output folder name: the prompt's ASCII words joined by "_". A prompt with characters the
    slug cannot show (any non-ASCII, or no letters at all) also gets 8 hex digits of its SHA-1, so that
    "一只猫" and "一只狗" do not share a folder."""
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:max_len].rstrip("_")
    if slug and prompt.isascii():
        return slug
    return f"{slug or 'run'}_{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"


OOM_KNOBS = ("Reduce memory with: --set batch_size=1; smaller renders (--set width=64 --set height=64); fewer "
             "samples per ray (--set render.samples_per_ray=256); a smaller hash table (--set field.log2_hashmap_size=17); "
             "fewer rays per chunk for previews/export (--set render.chunk_rays=8192, --mesh-resolution 128); for Stable "
             "Diffusion guidance --set guidance.options.latent_mode=linear or guidance.dtype=float16; or --device cpu.")


def run(prompt: str, out_dir=None, config: Optional[RunConfig] = None, overrides: Optional[List[str]] = None,
        config_file=None, resume: bool = False, force: bool = False, quiet: bool = False,
        cli: Optional[Dict[str, Any]] = None, preset: Optional[str] = None) -> Dict[str, Any]:
    """`fastdream run` as a function. Returns a summary dict (also written as metrics.json).

    cli: values of dedicated flags (steps, seed, device, guidance kind, model, reference scene, image), applied
    last. With an input image (`image`) the prompt may be empty: the photo is the front view of the object
    (image-to-3D, Zero-1-to-3 guidance by default).
    """
    wall0 = time.perf_counter()
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    image = cli.get("image")
    prompt = prompt.strip() if isinstance(prompt, str) else ""
    if not prompt and not image:
        raise FastDreamError("The prompt is empty: describe the object to create, e.g. "
                             "fastdream run \"a vase with pink flowers\", or turn a photo into 3D with "
                             "fastdream run --image photo.png.")
    if resume and force:
        raise FastDreamError("--resume and --force contradict each other: --resume continues the run in the output "
                             "folder, --force deletes it and starts over. Pass one.")
    out_dir = Path(out_dir) if out_dir else Path("outputs") / slugify(prompt or Path(str(image)).stem)
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
        base = build_config(config_file, overrides or [], base, preset=preset)
        log.info("fastdream: resuming %s from step %d", out_dir, int(state["step"]))
    elif resume:
        log.info("fastdream: nothing to resume in %s; starting a new run.", out_dir)
    if state is None:
        base = build_config(config_file, overrides or [], config, preset=preset)
    config = base
    apply_flags(config, cli)
    config.prompt = prompt if state is None else (config.prompt or prompt)
    if state is not None and config.prompt != prompt:
        log.warning("fastdream: the run in %s was for %r; continuing it (the prompt given now, %r, is ignored).",
                    out_dir, config.prompt, prompt)
    if state is not None:
        _warn_schedule_change(state, config)
    config.validate()
    family = guidance_registry.get(config.guidance.kind)
    if family.configure_run is not None and state is None:
        family.configure_run(config)
        config.validate()
    if config.image.path:  # on resume too: re-applied --set camera.* overrides must not move the training cameras
        follow_input_view(config)
        config.validate()
    device = resolve_device(config.device)
    existed_before = out_dir.exists()
    trainer = None

    with use_backend(config.backend):  # the run's ops backend, for training and export
        _backend.use_native(device)  # the native backend without a usable extension fails here, not in step 1
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
                         config.model if family.needs_model else config.guidance.kind)
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
            outputs = trainer.stage.export(out_dir, config.output, log.info)
            run_versions = versions(device)
        except BaseException as exc:
            if trainer is None or trainer.step == 0:  # failed before its first step: nothing worth keeping was written
                remove_if_created(out_dir, existed_before)
            if isinstance(exc, RuntimeError) and is_oom(exc):
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
        "device": device_name(device), **peak_memory(device), "versions": run_versions,
        "guidance": config.model if family.needs_model else config.guidance.kind,
        "seed": config.seed, "outputs": {k: os.path.relpath(v, out_dir) for k, v in outputs.items()},
        "checkpoint": os.path.relpath(trainer.last_checkpoint, out_dir) if trainer.last_checkpoint else None,
    }
    atomic.write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if config.output.report:
        from .report import write_report

        log.info("fastdream: report %s", write_report(out_dir))
    speed = f"{metrics['it_per_s']} it/s" if metrics["it_per_s"] else "no training step this time: outputs re-exported"
    log.info("fastdream: done in %.1fs (%s); outputs in %s", metrics["wall_time_s"], speed, out_dir)
    metrics["trainer"] = trainer
    return metrics


def follow_input_view(config: RunConfig) -> None:
    """Image-to-3D: training cameras, previews and turntables at the input camera's distance and field of view
    (the novel-view model is trained on views that share them), elevations over threestudio's -10..80 degrees."""
    im = config.image
    focal = 0.5 / math.tan(math.radians(im.fov) / 2)  # focal length / image height
    config.camera.distance_range = (im.distance, im.distance)
    config.camera.focal_range = (focal, focal)
    config.camera.elevation_range = (-10.0, 80.0)
    config.output.view_distance, config.output.view_fov = im.distance, im.fov


def _warn_schedule_change(state: Dict[str, Any], config: RunConfig) -> None:
    """Resuming with another --steps: the schedules that follow progress = step / steps change from here on."""
    before = int((state.get("config") or {}).get("steps", config.steps))
    if before != config.steps:
        log.warning("fastdream: this run was set up for %d steps and now runs to %d. The schedules that depend on the "
                    "total (the albedo-only phase, the guidance's timestep range and annealing) follow the new total "
                    "from step %d on, so the result will differ from a straight %d-step run.",
                    before, config.steps, int(state["step"]) + 1, config.steps)


def apply_flags(config: RunConfig, cli: Dict[str, Any]) -> None:
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
    if "image" in cli:
        config.image.path = str(cli["image"])
        if "guidance" not in cli and "reference_scene" not in cli:
            config.guidance.kind = "zero123"


@dataclass
class LoadedRun:
    """A run folder read back: its configuration, checkpoint and trained stage (in eval mode)."""
    folder: Path
    config: RunConfig
    checkpoint: Path
    state: Dict[str, Any] = field(repr=False)
    stage: Stage = field(repr=False)

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


def load_run(folder, device=None, checkpoint=None, overrides: Optional[List[str]] = None,
             configure=None) -> LoadedRun:
    """The run in `folder` rebuilt from its newest checkpoint (or `checkpoint`), on `device` (default: the
    run's own). `overrides` (key=value) and `configure(config)` adjust the stored configuration first."""
    folder = Path(folder)
    if checkpoint is None:
        if not folder.is_dir():
            raise FastDreamError(f"Run folder {folder} does not exist or is not a folder; pass the output folder of "
                                 "a `fastdream run`.")
        checkpoint = latest_checkpoint(folder / "checkpoints")
        if checkpoint is None:
            raise FastDreamError(f"Run folder {folder} has no checkpoints/step_*.pt: it is not a `fastdream run` output "
                                 "folder, or its run has not written a checkpoint yet.")
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint, kind=CHECKPOINT_KIND)
    config = apply_overrides(config_from_dict(state["config"]), overrides or [])
    if configure is not None:
        configure(config)
    config.validate()
    stage_name = state.get("stage", "nerf")  # checkpoints from before stages were named hold NeRF runs
    stage = build_stage(stage_name, config, resolve_device(device or config.device))
    try:
        stage.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        raise FastDreamError(f"Checkpoint {checkpoint} does not match its own configuration ({str(exc).splitlines()[0]}).") from None
    stage.train(False)
    return LoadedRun(folder=folder, config=config, checkpoint=checkpoint, state=state, stage=stage)


def export(out_dir, checkpoint=None, device: Optional[str] = None, overrides: Optional[List[str]] = None,
           **output_overrides) -> Dict[str, str]:
    """Redo a run's outputs (mesh, turntables, preview) from its latest (or a given) checkpoint."""
    def configure(config: RunConfig) -> None:
        for key, value in output_overrides.items():
            if value is not None:
                setattr(config.output, key, value)

    loaded = load_run(out_dir, device=device, checkpoint=checkpoint, overrides=overrides, configure=configure)
    log.info("fastdream: exporting %s (step %d)", loaded.checkpoint, loaded.step)
    with use_backend(loaded.config.backend):
        written = loaded.stage.export(Path(out_dir), loaded.config.output, log.info)
    if loaded.config.output.report:
        from .report import write_report

        written["report"] = str(write_report(out_dir))
    return written
