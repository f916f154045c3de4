"""The training configuration of `fastdream run`: one typed dataclass tree holding every knob.

Defaults follow DreamFusion (64x64 renders, batch 1, 10,000 steps, guidance scale 100, Adam with the
hash table at a 10x higher learning rate than the MLPs, random camera/light sampling, orientation
loss and an opacity regulariser, occupancy-grid updates every 16 steps). Every default is traced to the
paper or a peer (threestudio 28d9d80, stable-dreamfusion 5550b91) in the comment or docstring next to it.

Sources, later ones winning: the defaults here < a preset (``--preset draft``, see ``PRESETS``) < a YAML file (``--config FILE.yaml``, nested
sections as mappings) < ``--set key=value`` overrides (dotted keys for nested sections, e.g.
``--set field.log2_hashmap_size=16 --set camera.distance_range=1.5,2.0``) < the dedicated command
line flags (``--steps``, ``--seed``, ``--model`` ...). Values are coerced to the declared field types
(ints, floats such as ``1e-3``, booleans ``true/false/1/0/yes/no``, tuples written ``a,b`` or
``[a, b]``, ``none`` for optional fields). Unknown keys are rejected with the closest valid names.
The resolved configuration is written to ``DIR/config.yaml`` and stored in every checkpoint.

Shading schedule (DreamFusion renders albedo-only early on, then random shading): for the first
``shading.albedo_only_fraction`` of the steps every render is albedo; afterwards a mode is drawn per
step with probabilities ``shading.albedo`` / ``shading.lambertian`` / ``shading.textureless``
(defaults 0.2 / 0.4 / 0.4: geometry gets most of its signal from the shaded and textureless
renders, albedo keeps the colours honest). The probabilities are normalised, so they need not sum to 1.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _backend
from .cameras import CameraSamplerConfig
from .errors import FastDreamError
from .field import FieldConfig
from .guidance import registry as guidance_registry
from .renderer import RenderConfig
from .stages import STAGES

#: Named sets of overrides (``fastdream run --preset NAME``). "draft": a quick preview -- a smaller hash
#: grid and MLP, 32x32 renders, fewer samples per ray, a coarser occupancy grid and 1,000 steps (about a
#: minute on a GPU); every other setting (learning rates, cameras, shading, regularisers, guidance) keeps
#: its default, so a draft shows what the full recipe will do.
PRESETS: Dict[str, Tuple[str, ...]] = {
    "draft": ("steps=1000", "width=32", "height=32", "field.n_levels=8", "field.log2_hashmap_size=15",
              "field.max_resolution=256", "field.hidden_dim=32", "field.n_hidden_layers=1",
              "render.samples_per_ray=128", "grid.resolution=32"),
}


@dataclass
class GridConfig:
    resolution: int = 64            # occupancy cells per axis
    update_every: int = 16          # steps between occupancy-grid updates
    ema_decay: float = 0.95
    threshold: float = 0.01         # opacity (density * step size) above which a cell is occupied
    warmup_steps: int = 256         # until then every cell is re-evaluated at each update


@dataclass
class OptimConfig:
    lr_hash: float = 1e-2           # the hash table (instant-ngp / stable-dreamfusion: 10x the MLP rate)
    lr_mlp: float = 1e-3
    lr_background: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    grad_clip: float = 0.0          # > 0: clip the global gradient norm


@dataclass
class ShadingConfig:
    albedo_only_fraction: float = 0.1  # first fraction of the steps renders albedo only
    albedo: float = 0.2             # then: probability of each mode
    lambertian: float = 0.4
    textureless: float = 0.4


@dataclass
class RegularizerConfig:
    """Loss weights of the geometry regularisers (see ``fastdream.regularizers``), added to the SDS loss
    (which is averaged over the batch, as the peers do, so these balances hold for any batch size).

    orientation: DreamFusion's orientation loss, on every step (normals are computed on albedo steps
      too, as threestudio does). Its weight ramps linearly from ``orientation`` to ``orientation_end``
      over the first ``orientation_ramp`` of the steps: threestudio's ``lambda_orient: [0, 10., 1000.,
      5000]`` over its 10,000 steps (``configs/dreamfusion-sd.yaml``), with the same normalisation (by
      the rays with opacity > 0).
    opacity_sparsity: DreamFusion's opacity regulariser mean sqrt(a^2 + 0.01), on by default with
      threestudio's ``lambda_sparsity: 1.`` (``configs/dreamfusion-sd.yaml``).
    opacity_entropy: binary entropy of each ray's opacity (empty or opaque, no haze), weight ramped from 0
      to ``opacity_entropy`` over the first ``entropy_ramp`` of the steps, as stable-dreamfusion's
      ``lambda_entropy * min(1, 2 * step / iters)`` with ``--lambda_entropy 1e-3`` (``main.py``, ``nerf/utils.py``).
    Set a weight to 0 to turn its term off.
    """
    orientation: float = 10.0       # weight at the start of training
    orientation_end: float = 1000.0  # weight once the ramp is over
    orientation_ramp: float = 0.5   # fraction of the steps over which the weight ramps
    opacity_entropy: float = 1e-3   # weight once the ramp is over
    entropy_ramp: float = 0.5       # fraction of the steps over which the entropy weight ramps up from 0
    opacity_sparsity: float = 1.0

    def weights(self, progress: float) -> Dict[str, float]:
        """The weight of each term at this training progress in [0, 1] (host floats: no device sync)."""
        from .regularizers import ramp

        orient = ramp(self.orientation, self.orientation_end, progress, self.orientation_ramp) if self.orientation > 0 else 0.0
        return {"orient": orient, "entropy": ramp(0.0, self.opacity_entropy, progress, self.entropy_ramp),
                "sparsity": self.opacity_sparsity}


@dataclass
class GuidanceConfig:
    kind: str = "sd"                # a registered family: sd | if | reference (fastdream.guidance.registry)
    model: str = ""                 # hub id or local diffusers folder ("" -> the kind's default model)
    guidance_scale: float = 100.0
    t_min: float = 0.02
    t_max: float = 0.98
    weighting: str = "sds"          # sds | uniform | sqrt_alpha_sigma
    negative_prompt: str = ""
    dtype: str = ""                 # "" -> float16 on CUDA, float32 on the CPU
    reference_scene: str = ""       # kind=reference: .npz voxel scene or .obj/.ply/.glb mesh
    reference_resolution: int = 64  # voxels per axis when the reference is a mesh
    # further GuidanceOptions (e.g. latent_mode, attention; perp_neg=true and its perp_neg_f_* curves, off by
    # default as in both peers: see fastdream.guidance.base)
    options: Dict[str, Any] = _field(default_factory=dict)


@dataclass
class ImageConfig:
    """Image-to-3D (`fastdream run --image PHOTO`): the photo is the front view (azimuth 0) seen from a fixed
    camera; defaults are threestudio's Zero-1-to-3 setup (elevation 0, 3.8 scene radii, 20 degree field of view).
    Other training cameras are sampled at the same distance and field of view (what the novel-view model assumes)."""
    path: str = ""                  # the input photo; "" for text-to-3D
    elevation: float = 0.0          # the input view's elevation, degrees
    distance: float = 3.8           # its distance, in scene radii
    fov: float = 20.0               # its vertical field of view, degrees
    resolution: int = 256           # the photo is recentred into a square of this many pixels
    border_ratio: float = 0.2       # empty margin around the recentred object (fraction of the side)
    recenter: bool = True           # false: keep the photo's framing (padded to a square)
    rgb_weight: float = 5000.0      # reconstruction loss at the input camera: colour inside the mask ...
    mask_weight: float = 500.0      # ... and opacity toward the mask (threestudio's 500 / 50 against SDS x 0.1)
    # Magic123's joint prior: text SDS from a text-to-image model on the same renders, added to the novel-view SDS
    # with this weight (0: off, and the text model is never loaded). Magic123 (threestudio's
    # configs/magic123-coarse-sd.yaml) weighs SD's SDS 1 (lambda_sd) against Zero-1-to-3's 40 (lambda_3d_sd), with
    # CFG scales 100 and 5, both t in [0.2, 0.6], SD 1.5: against the novel-view SDS at weight 1 here, 0.025.
    # Needs a prompt (`fastdream run --image photo.png "a prompt"`).
    text_guidance_weight: float = 0.0
    text_guidance_model: str = ""   # hub id or local folder ("": the sd family's default, as text-to-3D uses)
    text_guidance_scale: float = 100.0  # its CFG scale (DreamFusion's and Magic123's 100)


@dataclass
class MeshStageConfig:
    """The mesh stage (``stages: [nerf, mesh]``, see ``fastdream.stages.mesh``): Magic3D's second stage.
    Defaults are threestudio's ``configs/magic3d-refine-sd.yaml`` (02d05b0): 5,000 steps of 512x512 renders
    (SD's own resolution: the latent is 64x64 with no upsampling), a tetrahedral grid of 128 cells per axis,
    Adam at 0.01 for every parameter, normal consistency at 10,000 and no Laplacian term, SDS timesteps up to
    0.5 (the coarse shape is settled: only detail is refined). The run's cameras, lights, shading
    probabilities, guidance and batch size are the NeRF stage's (threestudio narrows the elevation to
    -10..45 degrees and the field of view to 30..45; the NeRF stage's ranges keep the whole object, top
    included, in view, so a mesh refined from them has no unseen side)."""
    steps: int = 5000               # threestudio: trainer.max_steps
    resolution: int = 512           # render width = height (threestudio: data.width/height)
    tet_resolution: int = 128       # cells per axis of the tetrahedral grid (threestudio: isosurface_resolution)
    lr_geometry: float = 0.01       # signed distance and vertex offsets (threestudio: one lr of 0.01 for all)
    lr_hash: float = 0.01           # the colour field's hash table
    lr_mlp: float = 0.01            # the colour field's MLP
    lr_background: float = 0.01
    normal_consistency: float = 10000.0  # threestudio: lambda_normal_consistency
    laplacian: float = 0.0          # threestudio: lambda_laplacian_smoothness (0 in magic3d-refine)
    t_max: float = 0.5              # SDS timesteps in [guidance.t_min, t_max] (threestudio: max_step_percent)


@dataclass
class OutputConfig:
    preview_every: int = 500        # 0 disables previews (one is still written at the end)
    preview_views: int = 4
    preview_resolution: int = 128
    checkpoint_every: int = 1000    # 0: only at the end (and on Ctrl-C)
    keep_checkpoints: int = 3       # older step_*.pt files are removed (0 keeps all)
    log_every: int = 100            # --quiet / non-tty: a log line every N steps
    metrics_every: int = 50         # metrics.jsonl: device values read back in one go every N steps
    tensorboard: bool = False       # also log the metrics to DIR/tensorboard (needs the tensorboard package)
    report: bool = True             # write report.html at the end of the run
    mesh: bool = True
    mesh_resolution: int = 256
    mesh_threshold: float = 10.0    # density iso-level of the surface
    mesh_min_component: float = 0.05  # drop connected pieces with fewer faces than this fraction of the largest
    texture: bool = False           # also bake a UV texture with xatlas (when installed)
    texture_resolution: int = 1024
    video: bool = True
    video_frames: int = 120
    video_resolution: int = 256
    video_fps: int = 30
    video_elevation: float = 15.0
    view_distance: float = 0.0      # preview/video camera distance in scene radii (0: 2.2, or the camera range's top)
    view_fov: float = 45.0


@dataclass
class RunConfig:
    prompt: str = ""
    steps: int = 10000
    batch_size: int = 1
    width: int = 64
    height: int = 64
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    backend: str = ""               # ops backend: auto | torch | native ("": the process's choice, FASTDREAM_BACKEND or auto)
    # What is trained, in order (fastdream.stages): "nerf", or "nerf,mesh" for a mesh refined after it.
    # `steps` counts the NeRF stage's steps, `mesh.steps` the mesh stage's.
    stages: Tuple[str, ...] = ("nerf",)
    aabb: Tuple[float, float, float, float, float, float] = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)
    background: str = "mlp"         # mlp (learned, direction-dependent) | fixed
    background_color: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Probability, per training image, of a random solid-colour background instead of the background
    # model (stable-dreamfusion uses 0.5: it keeps the object from hiding in the background). 0 (off)
    # as in threestudio's DreamFusion config (``random_aug: false``).
    random_background: float = 0.0
    max_nonfinite_steps: int = 5    # stop after this many consecutive non-finite losses
    # CUDA runs: replay each step's forward and backward from CUDA graphs (fastdream.step_capture), one graph per
    # step key (shading mode, timestep range, buffer sizes...). Needs render.fixed_capacity. Off by default:
    # whether it pays depends on the GPU and the model (python -m benchmarks.gpu_check measures it).
    cuda_graph: bool = False
    field: FieldConfig = _field(default_factory=FieldConfig)
    render: RenderConfig = _field(default_factory=RenderConfig)
    camera: CameraSamplerConfig = _field(default_factory=CameraSamplerConfig)
    grid: GridConfig = _field(default_factory=GridConfig)
    optim: OptimConfig = _field(default_factory=OptimConfig)
    shading: ShadingConfig = _field(default_factory=ShadingConfig)
    reg: RegularizerConfig = _field(default_factory=RegularizerConfig)
    guidance: GuidanceConfig = _field(default_factory=GuidanceConfig)
    image: ImageConfig = _field(default_factory=ImageConfig)
    mesh: MeshStageConfig = _field(default_factory=MeshStageConfig)
    output: OutputConfig = _field(default_factory=OutputConfig)

    def validate(self) -> "RunConfig":
        def bad(msg: str):
            raise FastDreamError(f"Invalid configuration: {msg}")

        if self.cuda_graph and not self.render.fixed_capacity:
            bad("cuda_graph=true needs render.fixed_capacity=true: a step is replayed from a graph only when "
                "its shapes are static.")
        if self.steps < 1:
            bad(f"steps must be >= 1, got {self.steps} (to redo the mesh and videos of a finished run without "
                "training, use `fastdream export DIR`).")
        check_numbers(self)
        if self.batch_size < 1 or self.width < 8 or self.height < 8:
            bad(f"batch_size must be >= 1 and width/height >= 8, got {self.batch_size}, {self.width}x{self.height}.")
        kinds = guidance_registry.names()
        if self.guidance.kind not in kinds:
            bad(f"guidance.kind={self.guidance.kind!r}; choose one of {', '.join(kinds)}.")
        unknown = [s for s in self.stages if s not in STAGES]
        if not self.stages or unknown:
            bad(f"stages={','.join(self.stages)!r}; list one or more of {', '.join(STAGES)}, in order (e.g. nerf,mesh).")
        for before, after in zip(self.stages, self.stages[1:]):
            if not STAGES[after].can_follow(before):
                bad(f"stages={','.join(self.stages)!r}: the {after!r} stage cannot start from a {before!r} stage.")
        if not STAGES[self.stages[0]].can_follow(None):
            bad(f"stages={','.join(self.stages)!r}: the {self.stages[0]!r} stage starts from a trained stage "
                f"(e.g. nerf,{self.stages[0]}).")
        if self.mesh.t_max < self.guidance.t_min:
            bad(f"mesh.t_max ({self.mesh.t_max}) must be >= guidance.t_min ({self.guidance.t_min}).")
        if self.backend not in ("",) + _backend.BACKENDS:
            bad(f"backend={self.backend!r}; choose one of {', '.join(_backend.BACKENDS)} (or leave it empty).")
        conditioning = guidance_registry.get(self.guidance.kind).conditioning
        if self.image.path and "image" not in conditioning:
            bad(f"guidance {self.guidance.kind!r} is conditioned on text only and cannot take an input image; use "
                "--guidance zero123 (the default with --image) or reference.")
        if not self.image.path and "text" not in conditioning:
            bad(f"guidance {self.guidance.kind!r} turns one photo into 3D: pass it with --image PHOTO.png.")
        if self.image.text_guidance_weight > 0 and not self.image.path:
            bad("image.text_guidance_weight adds text SDS to image-to-3D (Magic123); it needs --image PHOTO. For "
                "text-to-3D the prompt's guidance is the run's guidance already.")
        if self.image.text_guidance_weight > 0 and not self.prompt.strip():
            bad(f"image.text_guidance_weight={self.image.text_guidance_weight:g} adds text guidance, but there is no "
                "prompt: describe the object after the photo, e.g. fastdream run --image photo.png \"a red teapot\", "
                "or leave the weight at 0.")
        if self.guidance.kind == "reference" and not self.guidance.reference_scene:
            bad("reference guidance needs a scene: --reference-scene SCENE.npz (or a .obj/.ply/.glb mesh).")
        if self.background not in ("mlp", "fixed"):
            bad(f"background must be 'mlp' or 'fixed', got {self.background!r}.")
        if self.guidance.kind == "reference" and self.random_background > 0:
            bad("random_background must be 0 with reference guidance: the reference scene is rendered over its "
                "fixed background colour, so a random one would be a wrong target.")
        s = self.shading
        if min(s.albedo, s.lambertian, s.textureless) < 0 or s.albedo + s.lambertian + s.textureless <= 0:
            bad("shading probabilities must be >= 0 and not all zero.")
        if not 0 <= s.albedo_only_fraction <= 1:
            bad(f"shading.albedo_only_fraction must lie in [0, 1], got {s.albedo_only_fraction}.")
        if self.grid.update_every < 1:
            bad(f"grid.update_every must be >= 1, got {self.grid.update_every}.")
        if self.output.mesh_resolution < 8:
            bad(f"output.mesh_resolution must be >= 8, got {self.output.mesh_resolution}.")
        if self.output.video_frames < 1 or self.output.video_resolution < 16:
            bad("output.video_frames must be >= 1 and output.video_resolution >= 16.")
        if self.max_nonfinite_steps < 1:
            bad(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}.")
        return self

    @property
    def model(self) -> str:
        return self.guidance.model or guidance_registry.default_model(self.guidance.kind)


# ---------------------------------------------------------------------------------------------- numbers

# Every numeric key and the interval its values must lie in ("[a, b]" closed, "(a, b)" open, inf allowed);
# every number must also be finite. Keys ending in _range hold (low, high) with low <= high.
NUMERIC_RANGES: Dict[str, str] = {
    "steps": "[1, inf)", "batch_size": "[1, inf)", "width": "[8, inf)", "height": "[8, inf)",
    "seed": "[0, 4611686018427387904]", "aabb": "(-inf, inf)", "background_color": "[0, 1]",
    "random_background": "[0, 1]",
    "max_nonfinite_steps": "[1, inf)",
    "field.n_levels": "[1, inf)", "field.n_features_per_level": "[1, inf)", "field.log2_hashmap_size": "[1, 30]",
    "field.base_resolution": "[1, inf)", "field.max_resolution": "[1, inf)", "field.hidden_dim": "[1, inf)",
    "field.n_hidden_layers": "[0, inf)", "field.blob_density": "(-inf, inf)", "field.blob_radius": "(0, inf)",
    "field.density_bias": "(-inf, inf)",
    "field.normal_epsilon": "(0, inf)", "field.init_scale": "[0, inf)",
    "field.progressive_start_levels": "[0, inf)", "field.progressive_every": "[0, 1]",
    "render.samples_per_ray": "[1, inf)", "render.cone_angle": "[0, inf)", "render.near": "[0, inf)",
    "render.far": "(0, inf)", "render.early_stop_eps": "[0, 1)", "render.alpha_threshold": "[0, 1)",
    "render.chunk_rays": "[1, inf)", "render.chunk_samples": "[1, inf)", "render.near_gradient_distance": "[0, inf)",
    "camera.elevation_range": "[-90, 90]", "camera.azimuth_range": "(-inf, inf)", "camera.distance_range": "(0, inf)",
    "camera.focal_range": "(0, inf)", "camera.light_distance_range": "(0, inf)",
    "camera.light_position_perturb": "[0, inf)", "camera.light_intensity_range": "[0, inf)",
    "camera.ambient_range": "[0, 1]",
    "camera.position_jitter": "[0, inf)", "camera.target_jitter": "[0, inf)", "camera.up_jitter": "[0, inf)",
    "camera.progressive_until": "[0, 1]", "camera.progressive_elevation": "[-90, 90]",
    "grid.resolution": "[1, inf)", "grid.update_every": "[1, inf)", "grid.ema_decay": "[0, 1]",
    "grid.threshold": "[0, inf)", "grid.warmup_steps": "[0, inf)",
    "optim.lr_hash": "[0, inf)", "optim.lr_mlp": "[0, inf)", "optim.lr_background": "[0, inf)",
    "optim.betas": "[0, 1)", "optim.eps": "[0, inf)", "optim.grad_clip": "[0, inf)",
    "shading.albedo_only_fraction": "[0, 1]", "shading.albedo": "[0, inf)", "shading.lambertian": "[0, inf)",
    "shading.textureless": "[0, inf)",
    "reg.orientation": "[0, inf)", "reg.opacity_entropy": "[0, inf)", "reg.opacity_sparsity": "[0, inf)",
    "reg.orientation_end": "[0, inf)", "reg.orientation_ramp": "[0, 1]", "reg.entropy_ramp": "[0, 1]",
    "guidance.guidance_scale": "[0, inf)", "guidance.t_min": "[0, 1)", "guidance.t_max": "(0, 1]",
    "guidance.reference_resolution": "[2, inf)",
    "output.preview_every": "[0, inf)", "output.preview_views": "[1, inf)", "output.preview_resolution": "[16, inf)",
    "output.checkpoint_every": "[0, inf)", "output.keep_checkpoints": "[0, inf)", "output.log_every": "[0, inf)",
    "output.metrics_every": "[1, inf)",
    "output.mesh_resolution": "[8, inf)", "output.mesh_threshold": "(-inf, inf)", "output.mesh_min_component": "[0, 1]",
    "output.texture_resolution": "[16, inf)", "output.video_frames": "[1, inf)", "output.video_resolution": "[16, inf)",
    "output.video_fps": "[1, inf)", "output.video_elevation": "[-90, 90]", "output.view_distance": "[0, inf)",
    "output.view_fov": "(0, 180)",
    "image.elevation": "[-90, 90]", "image.distance": "(0, inf)", "image.fov": "(0, 180)",
    "image.resolution": "[16, inf)", "image.border_ratio": "[0, 1)", "image.rgb_weight": "[0, inf)",
    "image.mask_weight": "[0, inf)", "image.text_guidance_weight": "[0, inf)", "image.text_guidance_scale": "[0, inf)",
    "mesh.steps": "[1, inf)", "mesh.resolution": "[8, inf)", "mesh.tet_resolution": "[2, inf)",
    "mesh.lr_geometry": "[0, inf)", "mesh.lr_hash": "[0, inf)", "mesh.lr_mlp": "[0, inf)",
    "mesh.lr_background": "[0, inf)", "mesh.normal_consistency": "[0, inf)", "mesh.laplacian": "[0, inf)",
    "mesh.t_max": "(0, 1]",
}


def _interval(text: str) -> Tuple[float, float, bool, bool]:
    lo, hi = (float(v) for v in text[1:-1].split(","))
    return lo, hi, text[0] == "[", text[-1] == "]"


def _numbers(obj, prefix: str = ""):
    """(dotted key, value) for every int/float field of a config tree, and the numbers inside tuple fields."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, key + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            yield key, tuple(value)


def check_numbers(config: "RunConfig") -> None:
    """Every number finite and in its interval (NUMERIC_RANGES): a NaN learning rate must not train a NaN model."""
    for key, value in _numbers(config):
        values = value if isinstance(value, tuple) else (value,)
        shown = ",".join(str(v) for v in values)
        if not all(math.isfinite(v) for v in values):
            raise FastDreamError(f"Invalid configuration: {key} must be a finite number, got {shown}.")
        interval = NUMERIC_RANGES.get(key)
        if interval is None:
            continue
        lo, hi, lo_closed, hi_closed = _interval(interval)
        for v in values:
            if v < lo or v > hi or (v == lo and not lo_closed) or (v == hi and not hi_closed):
                raise FastDreamError(f"Invalid configuration: {key} must lie in {interval}, got {shown}.")
        if key.endswith("_range") and values[0] > values[1]:
            raise FastDreamError(f"Invalid configuration: {key} is (low, high) with low <= high, got {shown}.")
    box = config.aabb
    if not all(box[i] < box[i + 3] for i in range(3)):
        raise FastDreamError(f"Invalid configuration: aabb is (xmin, ymin, zmin, xmax, ymax, zmax) with each min < max, "
                             f"got {','.join(str(v) for v in box)}.")


# ---------------------------------------------------------------------------------------------- coercion

_TRUE, _FALSE = ("true", "yes", "on", "1", "y"), ("false", "no", "off", "0", "n")


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls, prefix: str = "") -> List[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, prefix + f.name + ".")
    return keys


def _unknown(key: str, valid: Sequence[str]) -> FastDreamError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:  # try the last component alone (e.g. "lr_hash" for "optim.lr_hash")
        last = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] in difflib.get_close_matches(last, [v.rsplit(".", 1)[-1] for v in valid], n=3, cutoff=0.6)][:3]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return FastDreamError(f"Unknown configuration key {key!r}.{hint} See `fastdream run --help` or the config.yaml "
                          "written to an output folder for every valid key.")


def _parse_scalar_text(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert value (from YAML or a --set string) to the type hint of field `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(expected: str):
        raise FastDreamError(f"Configuration key {key!r} expects {expected}, got {value!r}.")

    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            return None
        return coerce(value, inner[0], key)
    if hint is Any:
        return _parse_scalar_text(value) if isinstance(value, str) else value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        fail("a boolean (true/false)")
    if hint is int:
        if isinstance(value, bool):
            fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.strip())
            except ValueError:
                fail("an integer")
            if f.is_integer():
                return int(f)
        fail("an integer")
    if hint is float:
        if isinstance(value, bool):
            fail("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        fail("a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        fail("a string")
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            text = value.strip()
            parsed = _parse_scalar_text(text) if text.startswith("[") else [p for p in text.strip("()").split(",") if p.strip()]
            items = parsed
        if not isinstance(items, (list, tuple)):
            fail("a list like a,b")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                fail(f"{len(args)} values")
            return tuple(coerce(v, a, key) for v, a in zip(items, args))
        elem = args[0] if args else Any
        out = [coerce(v, elem, key) for v in items]
        return tuple(out) if origin is tuple else out
    if origin is dict or hint is dict:
        if isinstance(value, str):
            value = _parse_scalar_text(value)
        if not isinstance(value, dict):
            fail("a mapping")
        return dict(value)
    return value


def _apply_mapping(obj, mapping: Dict[str, Any], prefix: str, root_cls) -> None:
    hints = _hints(type(obj))
    for name, value in mapping.items():
        key = prefix + str(name)
        if name not in hints:
            raise _unknown(key, _all_keys(root_cls))
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise FastDreamError(f"Configuration section {key!r} must be a mapping of keys, got {value!r}.")
            _apply_mapping(getattr(obj, name), value, key + ".", root_cls)
        else:
            setattr(obj, name, coerce(value, hint, key))


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """Apply ``key=value`` strings (dotted keys) in order."""
    for item in overrides or ():
        if "=" not in item:
            raise FastDreamError(f"--set expects key=value (e.g. --set optim.lr_hash=0.02), got {item!r}.")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        obj = config
        for i, part in enumerate(parts):
            hints = _hints(type(obj))
            if part not in hints:
                # a free-form dict (guidance.options.NAME=value)
                if isinstance(obj, dict):
                    obj[part] = _parse_scalar_text(text) if i == len(parts) - 1 else obj.setdefault(part, {})
                    break
                raise _unknown(key, _all_keys(RunConfig))
            hint = hints[part]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(hint):
                    raise FastDreamError(f"{key!r} is a section; set one of its keys, e.g. {key}.{dataclasses.fields(hint)[0].name}=...")
                setattr(obj, part, coerce(text, hint, key))
            else:
                nxt = getattr(obj, part)
                if isinstance(nxt, dict) and i == len(parts) - 2:
                    nxt[parts[-1]] = _parse_scalar_text(text)
                    break
                if not dataclasses.is_dataclass(nxt):
                    raise FastDreamError(f"Configuration key {'.'.join(parts[:i + 1])!r} is not a section, so {key!r} is not valid.")
                obj = nxt
    return config


def config_from_dict(data: Optional[Dict[str, Any]], base: Optional[RunConfig] = None) -> RunConfig:
    config = base if base is not None else RunConfig()
    if data:
        if not isinstance(data, dict):
            raise FastDreamError(f"A configuration must be a mapping of keys, got {type(data).__name__}.")
        if "stage" in data and "stages" not in data:  # written before runs had several stages
            data = {**{k: v for k, v in data.items() if k != "stage"}, "stages": [data["stage"]]}
        _apply_mapping(config, data, "", RunConfig)
    return config


def load_config_file(path, base: Optional[RunConfig] = None) -> RunConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FastDreamError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FastDreamError(f"Config file {path} is not valid YAML: {exc}") from None
    try:
        return config_from_dict(data or {}, base)
    except FastDreamError as exc:
        raise FastDreamError(f"In {path}: {exc}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(config: RunConfig) -> Dict[str, Any]:
    return _plain(dataclasses.asdict(config))


def dump_config(config: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)


def save_config(config: RunConfig, path) -> Path:
    from .atomic import write_text

    return write_text(path, dump_config(config))


def preset_overrides(name: Optional[str]) -> Tuple[str, ...]:
    """The ``key=value`` overrides of a preset (none for ``None`` or "")."""
    if not name:
        return ()
    if name not in PRESETS:
        raise FastDreamError(f"Unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]


def build_config(config_file=None, overrides: Sequence[str] = (), base: Optional[RunConfig] = None,
                 preset: Optional[str] = None) -> RunConfig:
    """defaults (or base) < preset < YAML file < --set overrides."""
    config = base if base is not None else RunConfig()
    config = apply_overrides(config, preset_overrides(preset))
    if config_file:
        config = load_config_file(config_file, config)
    return apply_overrides(config, overrides)
