"""Turn benchmarks/results/*.json into a markdown report (results/README.md) and PNG plots.

    python -m benchmarks.report [RESULTS_DIR] [--out README.md] [--no-plots]

The report opens with the headline: every target (met / missed / not measurable on that device) and
every ratio (native vs reference, fastdream vs tinycudann / nerfacc), then one table per result file
(device, versions, commit; median ms with IQR and min-max, throughput, peak memory). Plots (matplotlib,
optional: skipped with a message when missing): throughput against batch size / resolution, one line
per backend, for every measurement measured at more than one size.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from . import common  # noqa: E402

ORDER = ["ops", "raster", "mesh", "render", "iteration", "overhead", "memory", "fit", "sds", "e2e", "recipe", "mesh_stage"]


def load_results(folder) -> List[Dict]:
    files = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report: skipping {path.name}: {exc}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or "results" not in data or "benchmark" not in data:
            continue
        data["_file"] = path.name
        files.append(data)
    rank = {n: i for i, n in enumerate(ORDER)}
    files.sort(key=lambda d: (rank.get(d["benchmark"], 99), d["benchmark"], d.get("device", "")))
    return files


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a >= 1e6 or (0 < a < 1e-3):
        return f"{v:.{digits}g}"
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}" if a < 1 else f"{v:.{max(digits - len(str(int(a))), 0) + 1}f}".rstrip("0").rstrip(".")


def _size(r: Dict) -> str:
    if r.get("size") is None:
        return "–"
    s = r["size"]
    if isinstance(s, (int, float)) and float(s).is_integer():
        s = int(s)
        if s >= 1024 and (s & (s - 1)) == 0:
            return f"2^{s.bit_length() - 1}"
    return str(s)


def _device_label(d: Dict) -> str:
    env = d.get("env") or {}
    return f"{env.get('device_name') or d.get('device')} ({d.get('device')})"


def _env_line(d: Dict) -> str:
    env = d.get("env") or {}
    backend = env.get("backend") or {}
    git = env.get("git") or {}
    parts = [f"torch {env.get('torch')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env.get('cuda')}")
    if env.get("driver"):
        parts.append(f"driver {env.get('driver')}")
    parts.append(f"{env.get('cpu_count')} CPUs")
    if env.get("load_average"):
        parts.append("load avg " + "/".join(f"{x:.1f}" for x in env["load_average"]))
    parts.append(f"fastdream backend {backend.get('active')}")
    if git.get("commit"):
        parts.append(f"commit {git['commit'][:10]}{' (dirty)' if git.get('dirty') else ''}")
    if d.get("created"):
        parts.append(d["created"])
    return ", ".join(parts)


def _target_mark(met: Optional[bool]) -> str:
    return {True: "met", False: "**missed**", None: "n/a"}[met]


def headline(files: List[Dict]) -> List[str]:
    lines = ["## Headline", "", "### Targets", "",
             "| target | device | measured | goal | result |", "| --- | --- | --- | --- | --- |"]
    n = 0
    for d in files:
        for t in d.get("targets", []):
            unit = t.get("unit") or ""
            val = "–" if t.get("value") is None else f"{_num(t['value'])}{unit if unit != 'ms' else ' ms'}"
            goal = f"{t['op']} {_num(t['threshold'])}{unit if unit != 'ms' else ' ms'}"
            note = f" ({t['note']})" if t.get("met") is None and t.get("note") else ""
            lines.append(f"| {t['description']} | {_device_label(d)} | {val} | {goal} | {_target_mark(t.get('met'))}{note} |")
            n += 1
    if not n:
        lines.append("| (no targets in these files) | | | | |")
    lines += ["", "### Ratios (speed-up = slower ms / faster ms, same run, same machine)", "",
              "| comparison | device | speed-up |", "| --- | --- | --- |"]
    n = 0
    for d in files:
        for q in d.get("ratios", []):
            v = "–" if q.get("value") is None else f"{q['value']:.2f}x"
            lines.append(f"| {q['name']} | {_device_label(d)} | {v} |")
            n += 1
    if not n:
        lines.append("| (no ratios in these files) | | |")
    return lines + [""]


def file_table(d: Dict) -> List[str]:
    quick = " — quick mode (test sizes, not speed figures)" if d.get("quick") else ""
    lines = [f"## {d['benchmark']} on {_device_label(d)}{quick}", "",
             f"`{d['_file']}` — {_env_line(d)}" + (f"; wall {d['wall_s']:.0f} s" if d.get("wall_s") else ""), ""]
    if d.get("error"):
        lines += [f"**This benchmark failed:** `{d['error']}`", ""]
    for note in d.get("notes") or []:
        lines.append(f"> {note}")
    if d.get("notes"):
        lines.append("")
    rows = d.get("results") or []
    if not rows:
        return lines + ["(no results)", ""]
    lines += ["| measurement | backend | size | median ms | IQR ms | min–max ms | n | throughput | peak MB | extra |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        extra = r.get("extra") or {}
        ex = ", ".join(f"{k}={_num(v) if isinstance(v, float) else v}" for k, v in extra.items()
                       if k in ("samples_per_ray", "minutes_per_10k_steps", "latent_mode", "shading", "n_samples", "ops",
                                "kernel_ops", "host_syncs"))
        if r.get("median_ms") is None:
            lines.append(f"| {r['name']} | {r['backend']} | {_size(r)} | skipped | | | | | | {r.get('skipped') or ''} |")
            continue
        sp = r.get("spread") or {}
        tp = f"{_num(r['throughput'])} {r.get('throughput_unit') or ''}" if r.get("throughput") else "–"
        lines.append(f"| {r['name']} | {r['backend']} | {_size(r)} | {_num(r['median_ms'])} | {_num(sp.get('iqr_ms'))} | "
                     f"{_num(sp.get('min_ms'))}–{_num(sp.get('max_ms'))} | {sp.get('repeats', '')} | {tp} | "
                     f"{_num(r.get('peak_memory_mb'))} | {ex} |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------- plots
def _plot_groups(d: Dict) -> Dict[Tuple[str, str], Dict[str, List[Tuple[float, float]]]]:
    """(measurement name, size unit) -> backend -> [(size, throughput)], for numeric sizes only."""
    groups: Dict[Tuple[str, str], Dict[str, List[Tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in d.get("results") or []:
        if r.get("throughput") and isinstance(r.get("size"), (int, float)):
            groups[(r["name"], r.get("size_unit") or "size")][r["backend"]].append((float(r["size"]), float(r["throughput"])))
    return {k: v for k, v in groups.items() if any(len(pts) > 1 for pts in v.values())}


def make_plots(files: List[Dict], out_dir: Path) -> Tuple[List[Path], Optional[str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: plots skipped (pip install matplotlib)"
    written = []
    for d in files:
        for (name, unit), series in sorted(_plot_groups(d).items()):
            fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
            for backend, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            what = "resolution" if "pixel" in unit else ("batch size" if unit else "size")
            ax.set_xlabel(f"{what} ({unit})")
            tunit = next((r.get("throughput_unit") for r in d["results"] if r["name"] == name and r.get("throughput_unit")), "items/s")
            ax.set_ylabel(f"throughput ({tunit})")
            ax.set_title(f"{d['benchmark']}: {name} vs {what}\n{_device_label(d)}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{d['benchmark']}_{common.device_type(d.get('device', 'cpu'))}_{name}").strip("_")
            path = out_dir / f"{slug}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written, None


def overhead_comparison(files: List[Dict]) -> List[str]:
    """One table over every overhead_*.json (e.g. the run before a change and after it): per train step, ops
    outside the UNet/VAE, those that launch kernels, host syncs and ms."""
    rows = [(d, r) for d in files if d.get("benchmark") == "overhead" for r in d.get("results") or []]
    if len(rows) < 2:
        return []
    lines = ["## Overhead per train step, side by side", "",
             "| file | commit | guidance | ops | kernel ops | host syncs | ms/step (this CPU) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for d, r in rows:
        ex = r.get("extra") or {}
        commit = ((d.get("env") or {}).get("git") or {}).get("commit") or ""
        lines.append(f"| `{d['_file']}` | {commit[:10]} | {ex.get('guidance', '')} | {_num(ex.get('ops'))} | "
                     f"{_num(ex.get('kernel_ops'))} | {_num(ex.get('host_syncs'))} | {_num(r.get('median_ms'))} |")
    return lines + [""]


def render_markdown(files: List[Dict], plots: List[Path], plot_note: Optional[str]) -> str:
    lines = ["# fastdream benchmark results", "",
             "Generated by `python -m benchmarks.report` from the JSON files in this folder "
             "(`python -m benchmarks [--device cuda] [--quick]` writes them; format: `benchmarks/schema.json`). "
             "Times are medians over repeats after warm-up (CUDA events on GPU); IQR and min–max show the spread. "
             "Targets are marked n/a when they do not apply to the device measured.", ""]
    if not files:
        return "\n".join(lines + ["No result files found.", ""])
    lines += headline(files)
    lines += overhead_comparison(files)
    for d in files:
        lines += file_table(d)
    lines += ["## Plots", ""]
    if plot_note:
        lines += [plot_note, ""]
    elif not plots:
        lines += ["(no measurement was taken at more than one size)", ""]
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default=str(common.RESULTS_DIR))
    p.add_argument("--out", default=None, help="markdown file (default FOLDER/README.md)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    files = load_results(folder)
    plots, note = ([], "plots disabled (--no-plots)") if args.no_plots else make_plots(files, folder)
    if note:
        print(f"report: {note}")
    out = Path(args.out) if args.out else folder / "README.md"
    out.write_text(render_markdown(files, plots, note))
    print(f"report: {len(files)} result file(s) -> {out}" + (f", {len(plots)} plot(s)" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
