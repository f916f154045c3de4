"""Run every benchmark script present and write one JSON per script, then the report.

    python -m benchmarks [--device cpu|cuda|auto] [--quick] [--out DIR] [--only ops,render,...]
                         [--checkpoint CKPT] [--model ID_OR_DIR] [--no-report]

Writes DIR/<benchmark>_<device>.json (DIR defaults to benchmarks/results) for each script in
SCRIPTS that exists, validates it against schema.json, then renders DIR/README.md and plots.
A script that is missing is reported and skipped; one that fails writes a JSON with its error.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # python benchmarks/run_all.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from . import common  # noqa: E402

SCRIPTS = ("ops", "raster", "mesh", "render", "iteration", "overhead", "memory", "fit", "sds", "e2e", "recipe", "mesh_stage")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="fastdream benchmark suite")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds on a CPU")
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="folder for the JSON files (default benchmarks/results)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SCRIPTS)}")
    p.add_argument("--repeats", type=int, default=None, help="override the timed repeats of every script")
    p.add_argument("--warmup", type=int, default=None, help="override the warm-up calls of every script")
    p.add_argument("--checkpoint", default=None, help="render: a fastdream checkpoint to render instead of the synthetic field")
    p.add_argument("--model", default=None, help="e2e: diffusion model (hub id or folder); default --guidance reference")
    p.add_argument("--no-report", action="store_true", help="skip results/README.md and the plots")
    return p


def _module(name: str):
    modname = f"{__package__}.bench_{name}"
    try:
        return importlib.import_module(modname), None
    except ModuleNotFoundError as exc:
        if exc.name == modname:
            return None, "script not present"
        return None, f"import failed: {type(exc).__name__}: {exc}"
    except Exception as exc:
        return None, f"import failed: {type(exc).__name__}: {exc}"


def script_args(module, name: str, args) -> argparse.Namespace:
    """The script's own defaults (its build_parser) with the suite's shared flags applied."""
    argv: List[str] = ["--device", args.device]
    if args.quick:
        argv.append("--quick")
    if getattr(module, "build_parser", None) is not None:
        parser = module.build_parser()
        known = {a for action in parser._actions for a in action.option_strings}
        for flag, value in (("--repeats", args.repeats), ("--warmup", args.warmup),
                            ("--checkpoint", args.checkpoint), ("--model", args.model)):
            if value is not None and flag in known:
                argv += [flag, str(value)]
        ns = parser.parse_args(argv)
    else:
        ns = argparse.Namespace(device=args.device, quick=args.quick, repeats=args.repeats, warmup=args.warmup)
    ns.json = None  # the suite writes the file itself
    return ns


def normalise(data: Dict, name: str, ns) -> Dict:
    """Fill what a script left out (env, ratios ...) so every file has the full schema."""
    data = dict(data or {})
    device = common.resolve_device(getattr(ns, "device", None))
    data.setdefault("schema_version", common.SCHEMA_VERSION)
    data.setdefault("benchmark", name)
    data.setdefault("device", device)
    data.setdefault("quick", bool(getattr(ns, "quick", False)))
    if not isinstance(data.get("env"), dict) or "backend" not in data["env"]:
        data["env"] = {**common.environment(device), **(data.get("env") or {})}
    for key, default in (("config", {}), ("results", []), ("ratios", []), ("targets", []), ("notes", [])):
        if data.get(key) is None:
            data[key] = default
    return data


def run_one(name: str, args) -> Optional[Dict]:
    module, why = _module(name)
    device = common.resolve_device(args.device)
    if module is None:
        print(f"-- {name}: {why}; skipped", flush=True)
        return None
    ns = script_args(module, name, args)
    started = time.perf_counter()
    print(f"-- {name} ({device}{', quick' if args.quick else ''})", flush=True)
    try:
        data = module.run(ns)
        data = normalise(data, name, ns)
    except Exception as exc:  # one broken script must not lose the others' numbers
        traceback.print_exc()
        data = normalise({"benchmark": name, "error": f"{type(exc).__name__}: {exc}"}, name, ns)
    if data.get("wall_s") is None:
        data["wall_s"] = time.perf_counter() - started
    try:
        errors = common.validate(data)
    except ImportError:
        errors = []
        print("   (jsonschema not installed: result not validated)")
    if errors:
        data.setdefault("notes", []).append("schema validation errors: " + "; ".join(errors[:5]))
        print(f"   SCHEMA ERRORS in {name}: " + "; ".join(errors[:5]), flush=True)
    path = common.write_json(data, common.result_path(args.out, data.get("benchmark", name), device))
    common.print_summary(data)
    print(f"   wrote {path} ({data['wall_s']:.1f} s)", flush=True)
    return data


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.device = common.resolve_device(args.device)
    names = SCRIPTS
    if args.only:
        names = tuple(n.strip() for n in args.only.split(",") if n.strip())
        unknown = [n for n in names if n not in SCRIPTS]
        if unknown:
            print(f"--only: unknown benchmark(s) {unknown}; choose from {','.join(SCRIPTS)}", file=sys.stderr)
            return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        data = run_one(name, args)
        if data is not None and data.get("error"):
            failed.append(name)
    if not args.no_report:
        from . import report

        report.main([args.out])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
