"""The package's import graph: no cycles, and no arrow pointing up the layers
base -> ops -> engine -> guidance -> training (stages, loop, runs, fit, eval, batch) -> cli.
Every import counts, also those inside functions."""
import ast
import fnmatch
from pathlib import Path

import fastdream

ROOT = Path(fastdream.__file__).parent

LAYERS = [
    ("base", ["fastdream", "fastdream._version", "fastdream.errors", "fastdream._backend", "fastdream._C",
              "fastdream.runtime", "fastdream.diagnostics", "fastdream.checkpoint", "fastdream.atomic",
              "fastdream.output_folder", "fastdream.progress"]),
    ("ops", ["fastdream.ops", "fastdream.ops.*"]),
    ("engine", ["fastdream.cameras", "fastdream.field", "fastdream.occupancy", "fastdream.renderer", "fastdream.sample_buffer",
                "fastdream.regularizers", "fastdream.export", "fastdream.data", "fastdream.demo",
                "fastdream.image_input", "fastdream.tets", "fastdream.dmtet", "fastdream.mesh_renderer",
                "fastdream.step_capture"]),
    ("guidance", ["fastdream.guidance", "fastdream.guidance.*"]),
    ("training", ["fastdream.config", "fastdream.stages", "fastdream.stages.*", "fastdream.train", "fastdream.runs",
                  "fastdream.fit", "fastdream.evaluate", "fastdream.batch", "fastdream.metrics_log", "fastdream.report",
                  "fastdream.view"]),
    ("cli", ["fastdream.cli", "fastdream.cli.*"]),
]


def _modules():
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        out[name] = (path, is_package)
    out["fastdream._C"] = (None, False)  # the compiled extension (built or not; its imports are not Python's)
    return out


def _layer(name):
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return i
    raise AssertionError(f"module {name} is in no layer of tests/test_layout.py: place it in the layout")


def _edges(modules):
    edges = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        if path is None:
            continue
        package = name if is_package else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:  # `from pkg import submodule` points at the submodule
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                while t and t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != name:
                    edges[name].add(t)
    return edges


def test_every_module_has_a_layer_and_no_import_points_up():
    modules = _modules()
    edges = _edges(modules)
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
              for a, targets in edges.items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, "\n".join(sorted(upward))


def test_import_graph_has_no_cycles():
    edges = _edges(_modules())
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_the_graph_reader_sees_imports():
    """The checks above are only as good as the edges: spot-check a few known ones."""
    edges = _edges(_modules())
    assert "fastdream.runs" in edges["fastdream.cli.run"]
    assert "fastdream.stages" in edges["fastdream.train"]
    assert "fastdream.guidance.registry" in edges["fastdream.guidance.stable_diffusion"]
    assert "fastdream.ops" in edges["fastdream.stages.nerf"]


def test_readme_layout_table_matches_the_tree():
    import re

    readme = (ROOT.parent / "README.md").read_text()
    table = readme[readme.index("## Layout"):readme.index("### Extending")]
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, flags=re.M):
        paths = re.findall(r"`([^`]+)`", cell)
        if paths and paths[0].startswith("fastdream/"):
            folder = paths[0].rsplit("/", 1)[0] if not paths[0].endswith("/") else paths[0].rstrip("/").rsplit("/", 1)[0]
            for p in paths:
                named.add(p.rstrip("/") if "/" in p else f"{folder}/{p}")
    present = {f"fastdream/{p.name}" for p in ROOT.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and p.name != "__pycache__")}
    assert named == present, f"in the tree, not the table: {sorted(present - named)}; in the table, not the tree: {sorted(named - present)}"
