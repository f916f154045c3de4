"""`fastdream eval`: CLIP R-Precision of finished runs, as DreamFusion reports it.

    fastdream eval out/corgi out/teapot ... --prompts prompts.txt --clip ViT-B-32 ViT-B-16 ViT-L-14 --json eval.json

Metric. For every render of a run, CLIP embeds the image and every prompt of the candidate set
(``--prompts``: one caption a line, blank lines and ``#`` comments ignored, duplicates dropped); the
render is a hit when its run's own prompt scores strictly higher (cosine similarity) than every other
prompt of the set (ties count as misses). R-Precision is the fraction of hits over all renders of all
runs, reported per CLIP model and per render type; the per-run hit counts are in the JSON. With P
prompts in the set, chance level is 1/P. A run's own prompt is read from its ``config.yaml`` (or its
checkpoint) and must be in the set, otherwise the command stops with an error naming the run.

Protocol (DreamFusion, section 4, which follows Dream Fields): object-centric captions (the paper
uses the 153 object-centric captions of the Dream Fields COCO subset; ``fastdream/prompts/
object_centric.txt`` is a small example set in that style, not the paper's list); every run is rendered
from ``--views`` cameras (default 8) at a fixed elevation of 30 degrees (``--elevation``) with azimuths
evenly spaced around the object starting at the front (0, 45, ..., 315 degrees), looking at the
centre of the scene box from the run's own preview/video camera distance and field of view, at
``--resolution`` pixels square (default 224, CLIP's input size; the renders go through each CLIP
model's own preprocessing). Two render types:

* ``color``: the trained albedo lit by DreamFusion's diffuse shading (``lambertian``; a point light at
  the camera, intensity 0.8, ambient 0.2), i.e. what the run looks like;
* ``textureless``: the same geometry and light with the albedo replaced by white (DreamFusion's "Geo"
  column): it measures whether the *shape* alone matches the prompt.

Both use a plain white background (``--background white``; ``--background learned`` keeps the run's
learned background), so that the score judges the object and the textureless renders carry no colour
from the background. CLIP models are OpenAI's (``--pretrained openai``, the default for the ViT-B-32 /
ViT-B-16 / ViT-L-14 names, the models the paper uses).

CLIP comes from open_clip, an optional extra (``pip install 'fastdream[eval]'``), imported only when
the command runs. ``--clip`` takes an open_clip model name, a ``local-dir:FOLDER`` / folder holding
``open_clip_config.json`` (and weights), an ``hf-hub:ORG/REPO`` id, or a model-config ``.json`` file;
``--pretrained`` takes a tag, a local checkpoint file, or ``none`` (random weights, for smoke tests).
Weights download on first use into the Hugging Face cache; offline (``HF_HUB_OFFLINE=1`` or no network)
with nothing cached, the command fails with one paragraph naming the model and what to do.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import atomic
from .errors import FastDreamError

log = logging.getLogger("fastdream.eval")

RENDER_TYPES = ("color", "textureless")
SHADING_OF = {"color": "lambertian", "textureless": "textureless"}
DEFAULT_CLIP = "ViT-B-32"
DEFAULT_TAGS = {"ViT-B-32": "openai", "ViT-B-16": "openai", "ViT-L-14": "openai", "ViT-L-14-336": "openai",
                "RN50": "openai", "RN101": "openai"}
EXAMPLE_PROMPTS = Path(__file__).parent / "prompts" / "object_centric.txt"
INSTALL_HINT = "pip install 'fastdream[eval]'  (or: pip install open-clip-torch torchvision)"


# ---------------------------------------------------------------------------------------------- prompts

def read_prompts(path) -> List[str]:
    """Prompts of a text file: one a line; blank lines and lines starting with '#' are skipped;
    surrounding whitespace is stripped and repeated prompts are kept once (first occurrence)."""
    path = Path(path)
    if not path.is_file():
        raise FastDreamError(f"Prompt file {path} does not exist (expected a text file with one prompt per line).")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FastDreamError(f"Cannot read the prompt file {path}: {exc}.") from None
    prompts, seen, dupes = [], set(), 0
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text in seen:
            dupes += 1
            continue
        seen.add(text)
        prompts.append(text)
    if not prompts:
        raise FastDreamError(f"Prompt file {path} holds no prompts (one prompt per line; '#' starts a comment).")
    if dupes:
        log.warning("%s: %d repeated prompt(s) ignored", path, dupes)
    return prompts


# ---------------------------------------------------------------------------------------------- metric

def r_precision(image_embeddings, text_embeddings, targets) -> Dict[str, Any]:
    """CLIP R-Precision (R = 1): the fraction of images whose target text scores strictly highest.

    image_embeddings (N, D), text_embeddings (P, D) (normalised here), targets (N,) indices into the
    texts. Returns {"precision": float, "hits": (N,) bool tensor, "ranks": (N,) long tensor (0 = first;
    a tie counts against the target: rank = number of other texts scoring >= the target),
    "top": (N,) index of the best-scoring text, "scores": (N, P)}.
    """
    import torch

    img = torch.as_tensor(image_embeddings, dtype=torch.float64)
    txt = torch.as_tensor(text_embeddings, dtype=torch.float64)
    tgt = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1]:
        raise FastDreamError(f"r_precision: image embeddings (N,D) and text embeddings (P,D) must share D, "
                             f"got {tuple(img.shape)} and {tuple(txt.shape)}.")
    if tgt.numel() != img.shape[0] or (tgt.numel() and (tgt.min() < 0 or tgt.max() >= txt.shape[0])):
        raise FastDreamError("r_precision: need one target index in [0, P) per image.")
    img = torch.nn.functional.normalize(img, dim=-1)
    txt = torch.nn.functional.normalize(txt, dim=-1)
    scores = img @ txt.T
    own = scores.gather(1, tgt[:, None])
    others = torch.ones_like(scores, dtype=torch.bool)
    others[torch.arange(len(tgt)), tgt] = False
    ranks = ((scores >= own) & others).sum(dim=1)
    hits = ranks == 0
    precision = float(hits.double().mean()) if len(hits) else float("nan")
    return {"precision": precision, "hits": hits, "ranks": ranks, "top": scores.argmax(dim=1), "scores": scores}


# ---------------------------------------------------------------------------------------------- CLIP

@dataclass
class ClipModel:
    name: str             # short name: the open_clip model name (a config file's stem, a folder's name)
    pretrained: str       # tag, file path, or "none"
    model: Any
    preprocess: Any
    tokenizer: Any
    device: Any

    @property
    def label(self) -> str:
        return f"{self.name} ({self.pretrained})"

    def encode_texts(self, prompts: Sequence[str], batch_size: int = 256):
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                tokens = self.tokenizer(list(prompts[i:i + batch_size])).to(self.device)
                out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out)

    def encode_images(self, images, batch_size: int = 64):
        """images: (N, H, W, 3) uint8 tensor or array -> (N, D) normalised embeddings, through the
        model's own preprocessing (resize, centre crop, normalisation) applied to PIL images."""
        import numpy as np
        import torch
        from PIL import Image

        arr = np.asarray(images)
        out = []
        with torch.no_grad():
            for i in range(0, len(arr), batch_size):
                batch = torch.stack([self.preprocess(Image.fromarray(a)) for a in arr[i:i + batch_size]]).to(self.device)
                out.append(torch.nn.functional.normalize(self.model.encode_image(batch).float(), dim=-1).cpu())
        return torch.cat(out)


def import_open_clip():
    try:
        import open_clip  # noqa: F401
    except ImportError as exc:
        raise FastDreamError(
            f"`fastdream eval` needs open_clip, which is not installed or cannot be imported ({exc}). "
            f"Install the evaluation extra: {INSTALL_HINT}.") from None
    return open_clip


def _hub_offline() -> bool:
    from .guidance.loading import hub_offline

    return hub_offline()


def _resolve_clip_name(open_clip, name: str) -> str:
    """Model identifier for open_clip: a built-in name, local-dir:/hf-hub: ids, a folder or a config .json."""
    if name.startswith(("local-dir:", "hf-hub:")):
        if name.startswith("local-dir:") and not (Path(name[len("local-dir:"):]).expanduser() / "open_clip_config.json").is_file():
            raise FastDreamError(f"CLIP model '{name}': the folder has no open_clip_config.json (open_clip's "
                                 "local model folders hold open_clip_config.json and the weights).")
        return "local-dir:" + str(Path(name[len("local-dir:"):]).expanduser()) if name.startswith("local-dir:") else name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise FastDreamError(f"CLIP model folder '{name}' has no open_clip_config.json; pass an open_clip "
                                 "model name (e.g. ViT-B-32), or a folder written for open_clip's 'local-dir:' loading.")
        return f"local-dir:{path}"
    if path.suffix == ".json":
        if not path.is_file():
            raise FastDreamError(f"CLIP model config '{name}' does not exist.")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise FastDreamError(f"CLIP model config '{name}' is not readable JSON: {exc}.") from None
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise FastDreamError(f"CLIP model config '{name}' lacks embed_dim / vision_cfg / text_cfg (open_clip's "
                                 "model config format).")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(name) is None:
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=4, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise FastDreamError(f"Unknown CLIP model '{name}'.{hint} The paper's models are ViT-B-32, ViT-B-16 and "
                             "ViT-L-14; `python -c \"import open_clip; print(open_clip.list_models())\"` lists them all. "
                             "A local model folder or config .json is accepted too.")
    return name


def _resolve_pretrained(open_clip, model_id: str, name: str, pretrained: Optional[str]) -> Optional[str]:
    if model_id.startswith(("local-dir:", "hf-hub:")):
        return None  # the folder / hub repo carries its own weights
    if pretrained is None or pretrained == "":
        pretrained = DEFAULT_TAGS.get(model_id)
        if pretrained is None:
            tags = open_clip.list_pretrained_tags_by_model(model_id)
            if not tags:
                raise FastDreamError(f"CLIP model '{name}' has no published weights in open_clip; pass "
                                     "--pretrained PATH (a checkpoint file) or --pretrained none (random weights).")
            pretrained = tags[0]
    if pretrained.lower() in ("none", "random"):
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    tags = open_clip.list_pretrained_tags_by_model(model_id)
    if pretrained not in tags:
        looks_like_path = os.sep in pretrained or path.suffix in (".pt", ".pth", ".bin", ".safetensors")
        if looks_like_path:
            raise FastDreamError(f"CLIP checkpoint '{pretrained}' for model '{name}' does not exist.")
        raise FastDreamError(f"CLIP model '{name}' has no pretrained tag '{pretrained}'. Available: "
                             f"{', '.join(tags) or 'none'}; or pass a local checkpoint file, or 'none' for random weights.")
    return pretrained


def load_clip(name: str = DEFAULT_CLIP, pretrained: Optional[str] = None, device="cpu", cache_dir: Optional[str] = None) -> ClipModel:
    """An open_clip model in eval mode with its image preprocessing and tokenizer, or a FastDreamError
    saying what is missing (the extra, the model name, the tag, or the weights while offline)."""
    open_clip = import_open_clip()
    import torch

    model_id = _resolve_clip_name(open_clip, name)
    weights = _resolve_pretrained(open_clip, model_id, name, pretrained)
    shown = "none (random weights)" if weights is None and not model_id.startswith(("local-dir:", "hf-hub:")) else (weights or model_id)
    if weights is None and not model_id.startswith(("local-dir:", "hf-hub:")):
        log.warning("CLIP %s uses random weights: its R-Precision is meaningless (chance level)", name)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_id, pretrained=weights, device=device,
                                                                     cache_dir=cache_dir)
        tokenizer = open_clip.get_tokenizer(model_id, cache_dir=cache_dir)
    except torch.cuda.OutOfMemoryError:
        raise FastDreamError(f"Out of GPU memory while loading CLIP {name}; evaluate with fewer --clip models at "
                             "once or on the CPU (--device cpu).") from None
    except Exception as exc:  # open_clip wraps hub errors in RuntimeError / FileNotFoundError
        text = str(exc)
        if weights is not None and Path(weights).is_file():
            raise FastDreamError(f"Could not load the CLIP checkpoint '{weights}' into model '{name}' "
                                 f"({type(exc).__name__}: {text.splitlines()[0] if text else ''}). Check that it "
                                 "holds weights of that architecture.") from None
        offline = _hub_offline()
        download = any(s in text.lower() for s in ("download", "hub", "connection", "cache", "offline", "resolve"))
        if download or offline:
            why = ("the Hugging Face hub is switched off (HF_HUB_OFFLINE=1)" if offline
                   else "they could not be downloaded (no network connection?)")
            raise FastDreamError(
                f"The weights of CLIP model '{name}' (pretrained '{weights or model_id}') are not in the local cache "
                f"and {why}. Run `fastdream eval` once with internet access (or `python -c \"import open_clip; "
                f"open_clip.create_model_and_transforms('{model_id}', pretrained='{weights}')\"`) to cache them, or "
                f"pass a local checkpoint with --pretrained /path/to/open_clip_pytorch_model.bin.") from None
        raise FastDreamError(f"Could not load CLIP model '{name}' ({type(exc).__name__}: "
                             f"{text.splitlines()[0] if text else ''}).") from None
    model.eval()
    short = Path(model_id[len("local-dir:"):]).name if model_id.startswith("local-dir:") else model_id
    return ClipModel(name=short, pretrained=shown, model=model, preprocess=preprocess, tokenizer=tokenizer,
                     device=torch.device(device))


# ---------------------------------------------------------------------------------------------- runs

@dataclass
class EvalProtocol:
    views: int = 8                 # azimuths evenly spaced from the front: 0, 360/views, ...
    elevation: float = 30.0        # degrees
    resolution: int = 224          # square renders
    background: str = "white"      # white | learned
    distance: Optional[float] = None  # None: the run's preview/video camera distance
    fov: Optional[float] = None       # None: the run's preview/video field of view
    light_intensity: float = 0.8
    ambient: float = 0.2


@dataclass
class EvalRun:
    folder: Path
    prompt: str
    renderer: Any
    distance: float
    fov: float
    step: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)


def _run_prompt(folder: Path, state: Optional[dict] = None) -> Optional[str]:
    cfg = folder / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            data = yaml.safe_load(cfg.read_text()) or {}
            if isinstance(data, dict) and data.get("prompt"):
                return str(data["prompt"])
        except Exception:
            pass
    for name in ("metrics.json",):
        p = folder / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
                if isinstance(data, dict) and data.get("prompt"):
                    return str(data["prompt"])
            except ValueError:
                pass
    if state is not None:
        cfg = state.get("config")
        if isinstance(cfg, dict) and cfg.get("prompt"):
            return str(cfg["prompt"])
    return None


def load_run(folder, device="cpu", checkpoint=None) -> EvalRun:
    """The run's prompt and its trained renderer (field, background, occupancy grid) on device, rebuilt
    from its newest checkpoint (or `checkpoint`) by `fastdream.runs.load_run`, as `fastdream export` does."""
    from .export import view_distance
    from .runs import load_run as load_run_folder

    folder = Path(folder)
    loaded = load_run_folder(folder, device=device, checkpoint=checkpoint)
    config, renderer = loaded.config, loaded.stage.renderer
    prompt = config.prompt or _run_prompt(folder, loaded.state)
    if not prompt:
        raise FastDreamError(f"Run {folder} has no prompt in its configuration; cannot tell which caption it should match.")
    finished = (folder / "metrics.json").is_file()
    if not finished:
        log.warning("run %s has no metrics.json (unfinished?); evaluating its newest checkpoint %s", folder,
                    loaded.checkpoint.name)
    return EvalRun(folder=folder, prompt=prompt, renderer=renderer,
                   distance=view_distance(loaded.stage.scene_radius, config.output),
                   fov=float(config.output.view_fov), step=loaded.step,
                   info={"checkpoint": loaded.checkpoint.name, "finished": finished})


def eval_cameras(protocol: EvalProtocol, distance: float, fov: float, device="cpu"):
    from .cameras import orbit_cameras

    return orbit_cameras(protocol.views, protocol.resolution, protocol.resolution, elevation_deg=protocol.elevation,
                         distance=distance, fov_y_deg=fov, light_intensity=protocol.light_intensity,
                         ambient=protocol.ambient, device=device)


def render_run(run: EvalRun, protocol: EvalProtocol, device="cpu") -> Dict[str, Any]:
    """{render type: (V, R, R, 3) uint8 tensor} from the evaluation cameras."""
    import torch

    distance = protocol.distance if protocol.distance is not None else run.distance
    fov = protocol.fov if protocol.fov is not None else run.fov
    cams = eval_cameras(protocol, distance, fov, device=device)
    background = None if protocol.background == "learned" else torch.ones(3, device=device)
    out = {}
    run.renderer.eval()
    with torch.no_grad():
        for kind in RENDER_TYPES:
            rgb = run.renderer.render(cams, shading=SHADING_OF[kind], background=background).rgb
            out[kind] = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return out


def _pair_pretrained(models: Sequence[str], pretrained: Optional[Sequence[str]]) -> List[Optional[str]]:
    if not pretrained:
        return [None] * len(models)
    if len(pretrained) == 1:
        return list(pretrained) * len(models)
    if len(pretrained) != len(models):
        raise FastDreamError(f"--pretrained takes one value for all CLIP models or one per --clip model; got "
                             f"{len(pretrained)} for {len(models)} models.")
    return list(pretrained)


def evaluate_runs(run_dirs: Sequence, prompts: Sequence[str], clip_models: Sequence[str] = (DEFAULT_CLIP,),
                  pretrained: Optional[Sequence[str]] = None, protocol: Optional[EvalProtocol] = None,
                  device="auto", save_renders: Optional[Path] = None, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """R-Precision of runs against a prompt set; returns the JSON-able report (see module docstring)."""
    import torch

    protocol = protocol or EvalProtocol()
    if protocol.views < 1 or protocol.resolution < 16:
        raise FastDreamError("--views must be >= 1 and --resolution >= 16.")
    if protocol.background not in ("white", "learned"):
        raise FastDreamError(f"--background must be 'white' or 'learned', got {protocol.background!r}.")
    if not run_dirs:
        raise FastDreamError("No run folders given.")
    prompts = list(prompts)
    index = {p: i for i, p in enumerate(prompts)}
    from .runtime import resolve_device

    dev = resolve_device(device)
    t0 = time.time()

    # load every CLIP model first: a missing download fails before any rendering
    clips = [load_clip(m, p, device=dev, cache_dir=cache_dir) for m, p in zip(clip_models, _pair_pretrained(clip_models, pretrained))]
    text_emb = [c.encode_texts(prompts) for c in clips]

    # check all runs' prompts before rendering anything
    runs_meta = []
    for d in run_dirs:
        d = Path(d)
        prompt = _run_prompt(d)
        if not d.is_dir():
            raise FastDreamError(f"Run folder {d} does not exist.")
        if prompt is not None and prompt not in index:
            raise FastDreamError(f"The prompt of run {d} ({prompt!r}) is not in the prompt set ({len(prompts)} prompts); "
                                 "R-Precision ranks a run's own prompt among the set, so add it to the prompt file.")
        runs_meta.append(d)

    img_emb = {(ci, k): [] for ci in range(len(clips)) for k in RENDER_TYPES}
    targets, per_run = [], []
    for d in runs_meta:
        run = load_run(d, device=dev)
        if run.prompt not in index:
            raise FastDreamError(f"The prompt of run {d} ({run.prompt!r}) is not in the prompt set; add it to the prompt file.")
        renders = render_run(run, protocol, device=dev)
        del run.renderer
        if save_renders is not None:
            _save_strip(Path(save_renders), d, renders)
        targets += [index[run.prompt]] * protocol.views
        entry = {"run": str(d), "prompt": run.prompt, "step": run.step, **run.info, "results": {}}
        for ci, clip in enumerate(clips):
            for kind in RENDER_TYPES:
                emb = clip.encode_images(renders[kind])
                img_emb[(ci, kind)].append(emb)
                res = r_precision(emb, text_emb[ci], [index[run.prompt]] * protocol.views)
                entry["results"].setdefault(clip.name, {})[kind] = {
                    "hits": int(res["hits"].sum()), "views": protocol.views,
                    "top_prompts": [prompts[int(i)] for i in res["top"]],
                }
        per_run.append(entry)
        log.info("%s: %s", d, ", ".join(f"{c.name} {k} {entry['results'][c.name][k]['hits']}/{protocol.views}"
                                         for c in clips for k in RENDER_TYPES))

    results = []
    for ci, clip in enumerate(clips):
        row = {"clip": clip.name, "pretrained": clip.pretrained}
        for kind in RENDER_TYPES:
            res = r_precision(torch.cat(img_emb[(ci, kind)]), text_emb[ci], targets)
            row[kind] = res["precision"]
        results.append(row)
    return {
        "metric": "CLIP R-Precision (R=1): fraction of renders whose own prompt scores highest among the prompt set",
        "n_runs": len(per_run), "n_prompts": len(prompts), "n_renders_per_type": len(targets),
        "chance": 1.0 / len(prompts),
        "protocol": asdict(protocol) | {"azimuths": [round(i * 360.0 / protocol.views, 4) for i in range(protocol.views)],
                                        "shading": SHADING_OF},
        "results": results, "runs": per_run, "seconds": round(time.time() - t0, 2),
    }


def _save_strip(root: Path, run_dir: Path, renders: Dict[str, Any]) -> None:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = [np.concatenate(list(np.asarray(renders[k])), axis=1) for k in RENDER_TYPES]
    with atomic.temporary_path(root / f"{run_dir.name}.png") as tmp:
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)


def format_table(report: Dict[str, Any]) -> str:
    head = (f"CLIP R-Precision (%): {report['n_runs']} runs x {report['protocol']['views']} views, "
            f"{report['n_prompts']} prompts (chance {100 * report['chance']:.1f})")
    rows = [("CLIP model", "pretrained", "color", "textureless")]
    for r in report["results"]:
        rows.append((r["clip"], str(r["pretrained"]), f"{100 * r['color']:.1f}", f"{100 * r['textureless']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [head]
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
