"""Self-contained HTML pages of a run (`report.html`) and of a batch (`index.html`).

A run's page shows the mesh in an orbit viewer (<model-viewer>, vendored under vendor/ and inlined), the
colour and textureless turntables, the previews over training with a slider, the curves of metrics.jsonl,
the prompt, the config and metrics.json. Everything is inlined (media as data: URIs), so report.html opens
offline from anywhere with no server. `fastdream view` (fastdream/view.py) serves the same page with
links to the files instead and `live` set, and the page then polls `api/data` for new previews and points.
"""
from __future__ import annotations

import base64
import json
import logging
import mimetypes
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .. import atomic
from ..metrics_log import FILENAME as METRICS_LOG, read_metrics

log = logging.getLogger("fastdream")

HERE = Path(__file__).resolve().parent
VIEWER_JS = HERE / "vendor" / "model-viewer.min.js"
REPORT = "report.html"
INDEX = "index.html"
VIDEOS = {"colour": ("turntable.mp4", "turntable.gif"), "textureless": ("turntable_textureless.mp4", "turntable_textureless.gif")}

Link = Callable[[Path], str]


def inline_link(path: Path) -> str:
    """A data: URI holding the file (what makes report.html self-contained)."""
    mime = mimetypes.guess_type(path.name)[0] or ("model/gltf-binary" if path.suffix == ".glb" else "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def is_run_dir(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("config.yaml", METRICS_LOG, "metrics.json", "checkpoints"))


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_data(folder, link: Link = inline_link, live: bool = False) -> Dict[str, Any]:
    """What the run page shows; `link` turns a file of the run into a URL (inline data: URI by default)."""
    folder = Path(folder)
    config_text = (folder / "config.yaml").read_text() if (folder / "config.yaml").is_file() else ""
    prompt, steps = folder.name, None
    try:
        import yaml

        cfg = yaml.safe_load(config_text) or {}
        prompt, steps = cfg.get("prompt") or prompt, cfg.get("steps")
    except Exception:  # a half-written config.yaml: the folder name is a fine title meanwhile
        pass
    previews = []
    for p in sorted((folder / "previews").glob("step_*.png")):
        if p.stem.count(".") == 0 and p.stem[5:].isdigit():
            previews.append({"step": int(p.stem[5:]), "src": link(p)})
    videos = {}
    for kind, names in VIDEOS.items():
        for name in names:
            if (folder / name).is_file():
                videos[kind] = {"src": link(folder / name), "type": name.rsplit(".", 1)[1]}
                break
    glb = folder / "mesh.glb"
    return {"kind": "run", "prompt": prompt, "steps": steps, "config": config_text,
            "metrics": _read_json(folder / "metrics.json"), "rows": read_metrics(folder / METRICS_LOG),
            "previews": previews, "videos": videos, "glb": link(glb) if glb.is_file() else None, "live": live}


def _r_precision_by_run(folder: Path) -> Dict[str, str]:
    """Per-run hits from any `fastdream eval --json` report in the batch folder."""
    out: Dict[str, str] = {}
    for path in sorted(folder.glob("*.json")):
        report = _read_json(path)
        if not isinstance(report, dict) or "R-Precision" not in str(report.get("metric", "")):
            continue
        for entry in report.get("runs", []):
            parts = []
            for clip, kinds in (entry.get("results") or {}).items():
                colour = kinds.get("color") or {}
                if "hits" in colour:
                    parts.append(f"{colour['hits']}/{colour['views']} ({clip})")
            if parts:
                out[Path(entry.get("run", "")).name] = ", ".join(parts)
    return out


def index_data(folder, run_href: Callable[[Path], str], link: Link = inline_link, live: bool = False) -> Dict[str, Any]:
    """The batch page: one card per prompt of summary.json (or per run folder when there is none)."""
    folder = Path(folder)
    summary = _read_json(folder / "summary.json") or {}
    records = summary.get("prompts")
    if records is None:
        records = [{"prompt": p.name, "folder": str(p), "status": "done" if (p / "metrics.json").is_file() else "running"}
                   for p in sorted(folder.iterdir()) if p.is_dir() and is_run_dir(p)]
    r_precision = _r_precision_by_run(folder)
    cards = []
    for r in records:
        run = folder / Path(r.get("folder", "")).name
        previews = sorted((run / "previews").glob("step_*.png")) if run.is_dir() else []
        previews = [p for p in previews if p.stem[5:].isdigit()]
        metrics = _read_json(run / "metrics.json") or {}
        seconds = r.get("seconds") if r.get("seconds") is not None else metrics.get("wall_time_s")
        cards.append({"prompt": r.get("prompt", run.name), "status": r.get("status", "unknown"), "seconds": seconds,
                      "error": r.get("error"), "thumb": link(previews[-1]) if previews else None,
                      "href": run_href(run) if run.is_dir() else None, "r_precision": r_precision.get(run.name)})
    return {"kind": "index", "title": folder.resolve().name, "cards": cards, "live": live}


def _script_safe(text: str) -> str:
    return text.replace("</", "<\\/")  # no "</script>" can end the inline block early


def render_page(data: Dict[str, Any], viewer_src: Optional[str] = None) -> str:
    """The HTML page for run_data/index_data. viewer_src: a URL for model-viewer (None inlines the vendored copy)."""
    template = (HERE / "page.html").read_text()
    viewer = ""
    if data["kind"] == "run":
        if viewer_src is None:
            viewer = '<script type="module">' + _script_safe(VIEWER_JS.read_text()) + "</script>"
        else:
            viewer = f'<script type="module" src="{viewer_src}"></script>'
    title = "fastdream: " + str(data.get("prompt") or data.get("title", ""))
    from html import escape

    return (template.replace("{{TITLE}}", escape(title))
            .replace("{{DATA}}", _script_safe(json.dumps(data)))
            .replace("{{APP}}", _script_safe((HERE / "app.js").read_text()))
            .replace("{{VIEWER}}", viewer))


def write_report(folder) -> Path:
    """Write FOLDER/report.html (self-contained) for a run folder."""
    folder = Path(folder)
    return atomic.write_text(folder / REPORT, render_page(run_data(folder)))


def write_index(folder) -> Path:
    """Write FOLDER/index.html for a batch folder: cards linking to each run's report.html."""
    folder = Path(folder)
    data = index_data(folder, run_href=lambda run: f"{run.name}/{REPORT}")
    return atomic.write_text(folder / INDEX, render_page(data))
