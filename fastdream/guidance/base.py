"""Score Distillation Sampling (SDS), model-independent part.

DreamFusion's SDS gradient for a render x = g(theta) is

    grad_theta L_SDS = E_{t, eps} [ w(t) * (eps_hat(z_t; y, t) - eps) * dz/dtheta ]

where z is the diffusion model's input (SD: VAE latents of the render; IF: the render's pixels),
z_t = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) eps, and eps_hat is the classifier-free-guided
noise prediction  eps_u + s * (eps_c - eps_u)  (s = ``guidance_scale``, 100 by default). The UNet
Jacobian is skipped: the UNet runs under ``torch.no_grad``.

Gradient application. ``SDSOutput.loss`` is a surrogate whose gradient w.r.t. z is *exactly*
g = w(t) * (eps_hat - eps) (after zeroing non-finite entries and optional clipping) and whose value is
0.5 * ||g||^2 (handy for logging): one autograd node (``SDSSurrogate``) whose backward hands back g
bit-for-bit. Over a batch of B images the surrogate is *averaged*
(gradient g / B per image, value 0.5 * ||g||^2 / B), as both peers do (threestudio's
``guidance/stable_diffusion_guidance.py``: ``mse_loss(..., reduction="sum") / batch_size``;
stable-dreamfusion's ``guidance/sd_utils.py``: ``... / latents.shape[0]``): the balance between SDS and
the regularisers (which are means over rays) then does not change with the batch size.

Prediction types. The UNet's output is read according to the scheduler's ``prediction_type``:
"epsilon" is used as is; "v_prediction" (e.g. stabilityai/stable-diffusion-2-1, 768 px) is converted
to the noise it implies, eps = sqrt(alpha_bar) * v + sqrt(1 - alpha_bar) * z_t, before guidance and
the SDS gradient. Any other type ("sample", ...) is refused with a ``FastDreamError``.

Weightings w(t) (``GuidanceOptions.weighting``), with alpha_bar the cumulative product of alphas
and sigma^2 = 1 - alpha_bar:
  "sds"               sigma^2 = 1 - alpha_bar(t)            DreamFusion's choice (default)
  "uniform"           1
  "sqrt_alpha_sigma"  sqrt(alpha_bar(t)) * sigma(t)          down-weights both ends of the schedule

Timesteps are integers t ~ U{round(t_min*T), ..., round(t_max*T)} (T = number of training steps,
1000), one per image. Both bounds can follow a schedule: with ``t_max_end`` (``t_min_end``) set, t_max
(t_min) moves from ``t_max`` (``t_min``) to that value over training, linearly in ``progress``
("linear") or in sqrt(progress) ("sqrt"), as threestudio's ``min_step_percent`` / ``max_step_percent``
accept ``[start_step, start, end, end_step]``. By default both are constant (threestudio's and
stable-dreamfusion's DreamFusion configs).

Perp-Neg (``perp_neg``, off by default as in threestudio's and stable-dreamfusion's DreamFusion configs:
threestudio's ``prompt_processor.use_perp_neg: false``, stable-dreamfusion's ``--perpneg`` flag) fights the
multi-face "Janus" problem by steering each render away from the views it should not show: per camera two
negative view prompts with weights w_k <= 0 (``prompts.perp_neg_weights``, threestudio's curves
``perp_neg_f_*`` and their defaults), and the guided noise becomes

    eps_hat = eps_u + s * (e_pos + sum_k w_k * perp(e_k, e_pos)),   e_pos = eps_c - eps_u,  e_k = eps_k - eps_u

where perp(x, y) = x - (<x, y> / max(<y, y>, 1e-6)) y is the part of x orthogonal to y (per image): only
what a negative adds *beyond* the positive direction is pushed against, so the positive prompt is not
weakened. The UNet runs once on the 4B batch [uncond; cond; negative 1; negative 2]. It needs
view-dependent prompts; the positive embedding is the one ``view_selection`` gives (the paper's blend by
default, like threestudio's Perp-Neg, which blends the positive too).

Non-finite gradient entries are zeroed. ``SDSOutput.n_nonfinite`` is a 0-dim int64 *tensor* on the
guidance device (``int(out.n_nonfinite)`` reads it; that synchronizes) so the step itself never
waits for the GPU. A ``RuntimeWarning`` with the count is issued every ``nonfinite_check_every``
calls (one host sync per that many steps).
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import FastDreamError
from ..runtime import is_oom
from ..step_capture import replaying

log = logging.getLogger("fastdream")
from . import prompts as _prompts

WEIGHTINGS = ("sds", "uniform", "sqrt_alpha_sigma")
ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "math")
LATENT_MODES = ("vae", "linear")
ANNEALS = ("linear", "sqrt")
PREDICTION_TYPES = ("epsilon", "v_prediction")
VIEW_SELECTIONS = ("paper", "hard", "interpolate")
PERP_NEG_CURVES = ("perp_neg_f_sb", "perp_neg_f_fsb", "perp_neg_f_fs", "perp_neg_f_sf")


@dataclass
class GuidanceOptions:
    """Flat options of SDS guidance (embedded as-is in the training config)."""

    guidance_scale: float = 100.0  # classifier-free guidance scale s
    t_min: float = 0.02  # lowest timestep, as a fraction of the schedule
    t_max: float = 0.98  # highest timestep at the start of training
    t_max_end: Optional[float] = None  # anneal t_max towards this value by the end (None: no annealing)
    t_min_end: Optional[float] = None  # anneal t_min towards this value by the end (None: no annealing)
    t_anneal: str = "linear"  # "linear" | "sqrt": schedule of the annealing in progress
    weighting: str = "sds"  # "sds" (sigma^2 = 1 - alpha_bar, DreamFusion) | "uniform" | "sqrt_alpha_sigma"
    grad_clip: Optional[float] = None  # clamp each gradient entry to [-grad_clip, grad_clip] (None: off)
    attention: str = "auto"  # "auto" (xformers if installed and on CUDA, else sdpa) | "xformers" | "sdpa" | "math"
    channels_last: bool = True  # channels_last memory format for UNet/VAE (CUDA only)
    compile_unet: bool = False  # torch.compile the UNet (first steps slow, later ones faster)
    latent_mode: str = "vae"  # SD only: "vae" (exact, VAE encoder) | "linear" (RGB->latent 1x1 map at latent res)
    # SD only: for this first fraction of training the render's RGB and opacity, resized to the latent
    # resolution, are the 4-channel latent itself (no VAE); see stable_diffusion. 0 (default) = off.
    latent_warmup: float = 0.0
    view_dependent: bool = True  # append ", front view" etc. to the prompt per camera
    # "paper" (default): blend front/side/back by azimuth, hard switch to overhead above view_overhead_deg
    # (DreamFusion); "hard": pick one view (threestudio / stable-dreamfusion); "interpolate": blend, with
    # overhead ramped in linearly from view_overhead_deg to 90 degrees. See ``prompts``.
    view_selection: str = "paper"
    view_front_deg: float = 45.0  # |azimuth| <= this: front
    view_back_deg: float = 45.0  # |azimuth| >= 180 - this: back
    view_overhead_deg: float = 60.0  # elevation > this: overhead
    negative_prompt: str = ""  # unconditional branch text (set_prompt's argument wins when non-empty)
    nonfinite_check_every: int = 100  # warn about zeroed non-finite gradients every N calls (one sync)
    seed: Optional[int] = None  # seed of the guidance's own generator for t and noise (None: global RNG)
    # Perp-Neg (see the module docstring): off by default, as in both peers' DreamFusion configs. The negative
    # views' weights are -(a exp(-b r) + c) with (a, b, c) below: threestudio's defaults
    # (``prompt_processors/base.py``: perp_neg_f_sb, perp_neg_f_fsb, perp_neg_f_fs, perp_neg_f_sf).
    perp_neg: bool = False
    perp_neg_f_sb: Tuple[float, float, float] = (1.0, 0.5, -0.606)   # "side" negative between side and back
    perp_neg_f_fsb: Tuple[float, float, float] = (1.0, 0.5, 0.967)   # "front" negative between side and back
    perp_neg_f_fs: Tuple[float, float, float] = (4.0, 0.5, -2.426)   # "front" negative between front and side
    perp_neg_f_sf: Tuple[float, float, float] = (4.0, 0.5, -2.426)   # "side" negative between front and side

    def __post_init__(self):
        for name in PERP_NEG_CURVES:  # YAML / --set give lists
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    def validate(self) -> "GuidanceOptions":
        def bad(msg: str):
            raise FastDreamError(f"Invalid guidance option: {msg}")

        if not (0.0 <= self.t_min < 1.0 and 0.0 < self.t_max <= 1.0 and self.t_min <= self.t_max):
            bad(f"need 0 <= t_min <= t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}.")
        if self.t_max_end is not None and not (self.t_min <= self.t_max_end <= 1.0):
            bad(f"t_max_end must lie in [t_min, 1], got {self.t_max_end}.")
        if self.t_min_end is not None and not (0.0 <= self.t_min_end <= min(self.t_max, self.t_max_end or 1.0)):
            bad(f"t_min_end must lie in [0, min(t_max, t_max_end)], got {self.t_min_end}.")
        if self.t_anneal not in ANNEALS:
            bad(f"t_anneal={self.t_anneal!r}; choose one of {ANNEALS}.")
        if self.weighting not in WEIGHTINGS:
            bad(f"weighting={self.weighting!r}; choose one of {WEIGHTINGS}.")
        if self.attention not in ATTENTION_BACKENDS:
            bad(f"attention={self.attention!r}; choose one of {ATTENTION_BACKENDS}.")
        if self.latent_mode not in LATENT_MODES:
            bad(f"latent_mode={self.latent_mode!r}; choose one of {LATENT_MODES}.")
        if not 0.0 <= self.latent_warmup <= 1.0:
            bad(f"latent_warmup is a fraction of the training run and must lie in [0, 1], got {self.latent_warmup}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            bad(f"grad_clip must be positive or None, got {self.grad_clip}.")
        if not self.guidance_scale >= 0:
            bad(f"guidance_scale must be >= 0, got {self.guidance_scale}.")
        if self.view_selection not in VIEW_SELECTIONS:
            bad(f"view_selection={self.view_selection!r}; choose one of {VIEW_SELECTIONS}.")
        if not (0 <= self.view_overhead_deg < 90):
            bad(f"view_overhead_deg must lie in [0, 90), got {self.view_overhead_deg}.")
        if self.nonfinite_check_every < 1:
            bad(f"nonfinite_check_every must be >= 1, got {self.nonfinite_check_every}.")
        for name in PERP_NEG_CURVES:
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 3
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
                bad(f"{name} must be three finite numbers (a, b, c) of the weight curve a * exp(-b * r) + c, got {value!r}.")
        if self.perp_neg and not self.view_dependent:
            bad("perp_neg=true needs view-dependent prompts (view_dependent=true): its negative prompts are the "
                "views the camera does not see.")
        return self

    @classmethod
    def from_kwargs(cls, options: Optional["GuidanceOptions"] = None, **overrides: Any) -> "GuidanceOptions":
        """``options`` (or the defaults) with ``overrides`` applied; unknown names raise FastDreamError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise FastDreamError(f"Unknown guidance option(s) {unknown}; valid options are {sorted(names)}.")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **overrides).validate()


@dataclass
class SDSOutput:
    loss: torch.Tensor  # scalar surrogate; d(loss)/d(images) is exactly the SDS gradient
    t: torch.Tensor  # (B,) sampled integer timesteps
    grad_norm: torch.Tensor  # L2 norm over the batch of w(t) (eps_hat - eps), before the 1/B average (detached)
    n_nonfinite: Union[int, torch.Tensor]  # 0-dim int64 tensor: non-finite entries zeroed this call
    parts: Dict[str, "SDSOutput"] = dataclasses.field(default_factory=dict)  # a joint guidance's members, by name


OOM_HELP = (
    "Reduce memory with: a smaller batch size (images per step); a lower render resolution; half "
    "precision (dtype float16/bfloat16, the default on CUDA); attention='xformers' or 'sdpa' instead of "
    "'math'; latent_mode='linear' (skips the VAE encoder at 512x512, the largest activation memory of "
    "an SD step); compile_unet=False; or a smaller model."
)


def out_of_memory_error(exc: BaseException, what: str = "SDS guidance") -> FastDreamError:
    """A FastDreamError explaining a GPU out-of-memory in ``what`` and the knobs that reduce memory."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return FastDreamError(f"The GPU ran out of memory during {what} ({first}). {OOM_HELP}")


class SDSSurrogate(torch.autograd.Function):
    """``apply(z, g, norm)``: the value ``0.5 * norm^2 / B`` (``norm`` = ||g||, computed by the caller, which also
    reports it) with gradient ``g / B`` w.r.t. z (B images), in z's dtype. One node with a one-op backward (two
    for B > 1); the same surrogate written as autograd expressions costs a dozen ops per step."""

    @staticmethod
    def forward(ctx, z, grad, norm):
        batch = z.shape[0]
        ctx.save_for_backward(grad)
        ctx.batch, ctx.dtype = batch, z.dtype
        return norm.square().mul_(0.5 / batch)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        scale = grad_output if ctx.batch == 1 else grad_output / ctx.batch
        return (grad * scale).to(ctx.dtype), None, None


def perpendicular_component(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The part of each x[i] orthogonal to y[i] (tensors (N, ...)); y[i] = 0 leaves x[i] unchanged."""
    dims = tuple(range(1, x.dim()))
    coef = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(1e-6)
    return x - coef * y


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to size x size (antialiased when shrinking); identity when already that size."""
    h, w = images.shape[-2:]
    if h == size and w == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=(h > size or w > size))


@dataclass
class Condition:
    """What a guidance is conditioned on. Text families read the prompts; image-conditioned families
    (novel-view models) read the reference image and its camera pose."""

    prompt: str = ""
    negative_prompt: str = ""
    image: Optional[torch.Tensor] = None  # (3, H, W) in [0, 1]
    pose: Optional[Any] = None            # the reference image's camera (elevation, azimuth, distance)


class Guidance(abc.ABC):
    """Frozen 2D diffusion prior scoring renders with SDS. Subclasses provide text encoding,
    the image -> model-input map and the noise prediction; everything else lives here."""

    #: model input resolution (renders are resized to this before encoding)
    resolution: int
    #: the `Condition` fields this guidance reads (see registry.CONDITIONINGS)
    conditioning: Tuple[str, ...] = ("text",)

    def __init__(self, *, options: GuidanceOptions, device: torch.device, dtype: torch.dtype,
                 alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise FastDreamError(
                f"The diffusion model's scheduler predicts {prediction_type!r}, which SDS guidance does not support: "
                f"only {' and '.join(repr(p) for p in PREDICTION_TYPES)} models can be used (Stable Diffusion 1.x/2.x "
                "and DeepFloyd IF are); pick another --model.")
        self.prediction_type = prediction_type
        self.options = options.validate()
        self.device = torch.device(device)
        self.dtype = dtype
        self.alphas_cumprod = alphas_cumprod.detach().to(self.device, torch.float32)  # once, on device
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])
        self.generator: Optional[torch.Generator] = None
        if options.seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(int(options.seed))
        self._text_cache: dict = {}  # text -> (L, D) embedding on device
        self.prompt: Optional[str] = None
        self.negative_prompt: str = ""
        self._cond: Optional[torch.Tensor] = None  # (V, L, D): V = 4 views or 1
        self._uncond: Optional[torch.Tensor] = None  # (L, D)
        self._view_table: Optional[Tuple[torch.Tensor, Any]] = None  # (the _cond it was built from, its blend table)
        self._calls = 0
        self._nonfinite_total = torch.zeros((), dtype=torch.long, device=self.device)
        self._nonfinite_reported = 0
        self._schedule: Optional[Tuple[str, torch.Tensor]] = None  # (weighting, its per-timestep table)

    # ------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def _encode_text(self, texts: List[str]) -> torch.Tensor:
        """(N, L, D) text embeddings for N strings, on self.device in self.dtype (no grad)."""

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable map from renders (B,3,H,W) in [0,1] to the diffusion model's clean input z."""

    def model_input(self, images: torch.Tensor, opacity: Optional[torch.Tensor], progress: float) -> torch.Tensor:
        """The diffusion model's clean input z for renders at this training progress; opacity (B,1,H,W) is
        the renders' accumulated opacity where the caller has it. Default: encode_images(images)."""
        return self.encode_images(images)

    @abc.abstractmethod
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """The UNet's epsilon prediction for z_t (N, C, h, w) at timesteps t (N,) (no grad needed)."""

    # ------------------------------------------------------------------ prompts
    def set_condition(self, condition: Condition) -> None:
        """Condition the guidance; text-conditioned families take the prompts (see set_prompt)."""
        if condition.image is not None and "image" not in self.conditioning:
            raise FastDreamError(f"{type(self).__name__} is conditioned on text only; it cannot take a reference image.")
        if "image" in self.conditioning and condition.image is None:
            raise FastDreamError(f"{type(self).__name__} needs a reference image (and its camera pose) to condition on.")
        if "text" in self.conditioning:
            self.set_prompt(condition.prompt, condition.negative_prompt)

    def set_prompt(self, prompt: str, negative_prompt: str = "") -> None:
        """Validate the prompt and cache the per-view (and negative) text embeddings.

        The negative prompt is ``negative_prompt`` when non-empty, else ``options.negative_prompt``.
        The text encoder runs once per distinct string; later calls with seen strings are free.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise FastDreamError(
                "The text prompt is empty: SDS guidance needs a description of the object to create, "
                "e.g. prompt='a DSLR photo of a hamburger'.")
        if negative_prompt is None:
            negative_prompt = ""
        if not isinstance(negative_prompt, str):
            raise FastDreamError(f"The negative prompt must be a string, got {type(negative_prompt).__name__}.")
        prompt = prompt.strip()
        negative = negative_prompt.strip() or self.options.negative_prompt.strip()
        texts = _prompts.view_prompts(prompt) if self.options.view_dependent else [prompt]
        self._warn_if_truncated(texts + [negative])
        emb = self.embed_texts(texts + [negative])  # one text-encoder call for all unseen strings
        self._cond, self._uncond = emb[:-1], emb[-1]
        self.prompt, self.negative_prompt = prompt, negative

    def _warn_if_truncated(self, texts: Sequence[str]) -> None:
        """The text encoder reads a fixed number of tokens (77 for SD's CLIP); say so when a prompt is cut."""
        tokenizer = getattr(self, "tokenizer", None)
        limit = getattr(self, "max_length", None) or getattr(tokenizer, "model_max_length", None)
        if tokenizer is None or not limit or limit > 100_000:  # no tokenizer, or no limit
            return
        lengths = {t: len(tokenizer(t, truncation=False, verbose=False).input_ids) for t in texts if t}
        longest = max(lengths, key=lengths.get, default=None)
        if longest is not None and lengths[longest] > limit:
            log.warning("fastdream: the prompt %r is %d tokens long (with the view suffix and start/end tokens), but "
                        "the text encoder reads only %d; the rest is cut off and ignored. Shorten the prompt.",
                        longest, lengths[longest], limit)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, L, D) embeddings of ``texts``, computed in one text-encoder call for the unseen ones."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            with torch.no_grad():
                emb = self._encode_text(missing)
            for text, e in zip(missing, emb):
                self._text_cache[text] = e
        return torch.stack([self._text_cache[t] for t in texts])

    def text_embeddings(self, cameras: Any, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond), each (B, L, D), for the cameras (None: the plain prompt / first view)."""
        if self._cond is None:
            raise FastDreamError("No prompt set: call guidance.set_prompt('a description') before the first step.")
        o = self.options
        cond = self._cond
        if cond.shape[0] == 1 or cameras is None:
            if cond.shape[0] > 1:  # no cameras: front view prompt
                cond = cond[:1]
            c = cond.expand(batch_size, -1, -1)
        else:
            elev, azim = self._camera_angles(cameras, batch_size)
            if o.view_selection != "hard":
                if self._view_table is None or self._view_table[0] is not cond:  # once per prompt
                    self._view_table = (cond, _prompts.view_blend_table(cond))
                c = _prompts.blend_views(self._view_table[1], elev, azim, overhead_deg=o.view_overhead_deg,
                                         overhead_ramp=o.view_selection == "interpolate").to(cond.dtype)
            else:
                idx = _prompts.view_index(elev, azim, front_deg=o.view_front_deg, back_deg=o.view_back_deg,
                                          overhead_deg=o.view_overhead_deg)
                c = cond[idx]
        return c, self._uncond.expand(batch_size, -1, -1)

    def _camera_angles(self, cameras: Any, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(elevation, azimuth) in degrees, each (B,) float32 on the guidance device."""
        def flat(angles):  # (B,) float32 on the device: no op when the cameras' angles already are
            a = torch.as_tensor(angles).to(self.device, torch.float32, non_blocking=True)
            return a if a.dim() == 1 else a.reshape(-1)

        elev, azim = flat(cameras.elevation_deg), flat(cameras.azimuth_deg)
        if elev.shape[0] != batch_size:
            raise FastDreamError(f"Got {batch_size} images but {elev.shape[0]} cameras; they must match.")
        return elev, azim

    def perp_neg_embeddings(self, cameras: Any, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Perp-Neg's negatives: embeddings (B, 2, L, D) of the two negative view prompts of each camera and
        their weights (B, 2) float32 (see ``prompts.perp_neg_weights``)."""
        if self._cond is None or self._cond.shape[0] != len(_prompts.VIEWS):
            raise FastDreamError("Perp-Neg needs the view-dependent prompt embeddings: set view_dependent=true and "
                                 "call guidance.set_prompt('a description') before the first step.")
        if cameras is None:
            raise FastDreamError("Perp-Neg needs the cameras of the renders (their azimuth and elevation).")
        o = self.options
        elev, azim = self._camera_angles(cameras, batch_size)
        views, weights = _prompts.perp_neg_weights(elev, azim, o.perp_neg_f_sb, o.perp_neg_f_fsb, o.perp_neg_f_fs,
                                                   o.perp_neg_f_sf, overhead_deg=o.view_overhead_deg)
        return self._cond[views], weights

    # ------------------------------------------------------------------ schedule
    def _annealed(self, start: float, end: Optional[float], progress: float) -> float:
        if end is None:
            return start
        p = min(max(float(progress), 0.0), 1.0)
        if self.options.t_anneal == "sqrt":
            p = math.sqrt(p)
        return start + (end - start) * p

    def t_max_at(self, progress: float) -> float:
        return self._annealed(self.options.t_max, self.options.t_max_end, progress)

    def t_min_at(self, progress: float) -> float:
        return self._annealed(self.options.t_min, self.options.t_min_end, progress)

    def timestep_range(self, progress: float) -> Tuple[int, int]:
        """Inclusive integer range [lo, hi] of timesteps at this training progress."""
        T = self.num_train_timesteps
        lo = min(max(int(round(self.t_min_at(progress) * T)), 0), T - 1)
        hi = min(max(int(round(self.t_max_at(progress) * T)), lo), T - 1)
        return lo, hi

    def step_key(self, progress: float) -> Tuple:
        """Every host value a call at this progress builds into its ops (the timestep range, the latent
        warm-up): calls with equal keys run the same ops on the same shapes (`fastdream.step_capture`)."""
        warmup = getattr(self, "in_latent_warmup", None)
        return (self.timestep_range(progress), bool(warmup(progress)) if warmup is not None else False)

    def sample_timesteps(self, batch_size: int, progress: float) -> torch.Tensor:
        lo, hi = self.timestep_range(progress)
        return torch.randint(lo, hi + 1, (batch_size,), device=self.device, generator=self.generator)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t), (B,) float32."""
        ab = self.alphas_cumprod[t]
        if self.options.weighting == "sds":
            return 1.0 - ab
        if self.options.weighting == "uniform":
            return torch.ones_like(ab)
        return ab.sqrt() * (1.0 - ab).sqrt()

    def schedule_at(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar), w) at timesteps t (B,), each (B, 1, 1, 1) float32: rows of a
        table computed once per weighting, read with one index op per step."""
        weighting = self.options.weighting
        if self._schedule is None or self._schedule[0] != weighting:
            every_t = torch.arange(self.num_train_timesteps, device=self.device)
            ab = self.alphas_cumprod
            table = torch.stack([ab.sqrt(), (1.0 - ab).sqrt(), self.weight(every_t)])
            self._schedule = (weighting, table.view(3, -1, 1, 1, 1))
        return self._schedule[1][:, t].unbind(0)

    # ------------------------------------------------------------------ SDS
    def guided_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                     negatives: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One UNet call on [uncond; cond] (and the Perp-Neg ``negatives``: embeddings (B, K, L, D) and weights
        (B, K), appended as K more copies of the batch); returns (eps_hat, eps_cond, eps_uncond), float32."""
        n = z_t.shape[0]
        embeddings = [uncond, cond]
        if negatives is not None:
            embeddings += list(negatives[0].transpose(0, 1))
        copies = len(embeddings)
        tt = t.repeat(copies)
        with torch.no_grad(), self._autocast():
            eps = self.predict_noise(z_t.repeat(copies, 1, 1, 1).to(self.dtype), tt, torch.cat(embeddings).to(self.dtype))
        eps = eps.float()
        if self.prediction_type == "v_prediction":  # v = sqrt(ab) eps - sqrt(1-ab) z  =>  eps = sqrt(ab) v + sqrt(1-ab) z_t
            ab = self.alphas_cumprod[tt.to(self.device, torch.long)].view(-1, 1, 1, 1)
            eps = ab.sqrt() * eps + (1.0 - ab).sqrt() * z_t.float().repeat(copies, 1, 1, 1)
        eps_u, eps_c, *eps_negatives = eps.split(n)
        if negatives is None:  # eps_u + s (eps_c - eps_u) in one op
            return torch.lerp(eps_u, eps_c, self.options.guidance_scale), eps_c, eps_u
        # Perp-Neg: push against what each negative adds orthogonally to the positive
        weights = negatives[1].to(self.device, torch.float32)
        direction = positive = eps_c - eps_u
        for k, eps_k in enumerate(eps_negatives):
            direction = direction + weights[:, k].view(-1, 1, 1, 1) * perpendicular_component(eps_k - eps_u, positive)
        eps_hat = torch.add(eps_u, direction, alpha=self.options.guidance_scale)
        return eps_hat, eps_c, eps_u

    def sds_from_latents(self, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                         progress: float = 0.0, *, t: Optional[torch.Tensor] = None,
                         noise: Optional[torch.Tensor] = None,
                         negatives: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> SDSOutput:
        """SDS on the model input z (B,C,h,w) (latents for SD, pixels in [-1,1] for IF); ``negatives``: Perp-Neg's
        (see ``perp_neg_embeddings``)."""
        b = z.shape[0]
        if t is None:
            t = self.sample_timesteps(b, progress)
        t = t.to(self.device, torch.long)
        with torch.no_grad():  # z's gradient is the SDSSurrogate's: nothing here is recorded (or detached)
            z32 = z.float()
            if noise is None:
                noise = torch.randn(z32.shape, device=self.device, dtype=torch.float32, generator=self.generator)
            noise = noise.to(self.device, torch.float32)
            sqrt_ab, sqrt_one_minus_ab, w = self.schedule_at(t)
            z_t = torch.addcmul(sqrt_ab * z32, sqrt_one_minus_ab, noise)
            extra = {} if negatives is None else {"negatives": negatives}  # families with their own CFG take none
            eps_hat, _, _ = self.guided_noise(z_t.to(self.dtype), t, cond, uncond, **extra)
            raw_grad = w * (eps_hat - noise)
            grad = torch.nan_to_num(raw_grad, nan=0.0, posinf=0.0, neginf=0.0)
            n_nonfinite = (grad != raw_grad).sum()  # NaN != anything; +-inf became 0
            if self.options.grad_clip is not None:
                grad = grad.clamp(-self.options.grad_clip, self.options.grad_clip)
            norm = torch.linalg.vector_norm(grad)
        loss = SDSSurrogate.apply(z, grad, norm)
        self._account_nonfinite(n_nonfinite)
        return SDSOutput(loss=loss, t=t, grad_norm=norm, n_nonfinite=n_nonfinite)

    def __call__(self, images: torch.Tensor, cameras: Any, shading: str = "albedo", progress: float = 0.0,
                 *, t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                 opacity: Optional[torch.Tensor] = None) -> SDSOutput:
        """SDS on renders ``images`` (B,3,H,W) in [0,1] with their opacity (B,1,H,W) if known.
        ``t``/``noise`` override the random draws (tests)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise FastDreamError(f"SDS guidance expects images of shape (B, 3, H, W), got {tuple(images.shape)}.")
        b = images.shape[0]
        try:
            cond, uncond = self.text_embeddings(cameras, b)
            negatives = self.perp_neg_embeddings(cameras, b) if self.options.perp_neg else None
            with self._autocast():
                z = self.model_input(images.to(self.device), None if opacity is None else opacity.to(self.device),
                                     progress)
            return self.sds_from_latents(z, cond, uncond, progress, t=t, noise=noise, negatives=negatives)
        except RuntimeError as exc:
            if is_oom(exc):
                raise out_of_memory_error(exc) from None
            raise

    # ------------------------------------------------------------------ internals
    def _autocast(self):
        """Autocast off, also for fp16/bf16 on CUDA: the networks and their inputs are already in
        ``self.dtype``, and autocast would run every GroupNorm/LayerNorm in float32 and cast back
        (hundreds of extra kernels per UNet call)."""
        return torch.autocast(self.device.type, enabled=False)

    def _account_nonfinite(self, n: torch.Tensor) -> None:
        self._nonfinite_total += n
        if not replaying():  # a replayed step's call is counted by the training loop (count_call)
            self.count_call()

    def count_call(self) -> None:
        """One more SDS call; every ``nonfinite_check_every`` calls the non-finite total is read back and reported."""
        self._calls += 1
        if self._calls % self.options.nonfinite_check_every == 0:
            self.report_nonfinite()

    def report_nonfinite(self) -> int:
        """Total zeroed non-finite gradient entries so far; warns if it grew since the last report (syncs)."""
        total = int(self._nonfinite_total)
        if total > self._nonfinite_reported:
            warnings.warn(
                f"SDS guidance zeroed {total - self._nonfinite_reported} non-finite gradient entries "
                f"({total} in total over {self._calls} steps). Occasional ones are harmless; many mean the "
                "renders or the model overflow (try float32/bfloat16, a lower learning rate or grad_clip).",
                RuntimeWarning, stacklevel=3)
            self._nonfinite_reported = total
        return total

    def describe(self) -> dict:
        """Small JSON-able summary (model kind, resolution, dtype, options)."""
        return {"class": type(self).__name__, "resolution": self.resolution, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "options": dataclasses.asdict(self.options)}
