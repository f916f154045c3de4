"""Rewrites each CUDA launch `K<<<cfg>>>(args)` of a source into
`::cudaemu::launch_at("K", "file", __LINE__, K, cfg)(args)` (see shim/emulated_cuda.h), keeping line
numbers. Applied to the .cu files and to every header under csrc/ (a launch may sit in a header: the
kernel of fastdream/parallel_for.h), which build.py mirrors into its build folder."""
from __future__ import annotations

import re

# kernel name, optional template arguments (one level of nesting: K<F, S, Acc<P>>), <<<config>>>(
LAUNCH = re.compile(r"(?P<k>[A-Za-z_][\w:]*(?:<(?:[^<>;()]|<[^<>;()]*>)*>)?)<<<(?P<cfg>[^\n]*?)>>>\(")


def translate(source: str, filename: str, site: str = "") -> tuple[str, int]:
    """(host C++ text, number of launches rewritten). filename goes into `#line` (diagnostics and
    __FILE__ name the original); site names the file in the launch statistics (default: filename).
    Raises ValueError on a launch it cannot parse."""
    count = 0
    site = site or filename

    def rewrite(m: re.Match) -> str:
        nonlocal count
        count += 1
        return f'::cudaemu::launch_at("{m["k"]}", "{site}", __LINE__, {m["k"]}, {m["cfg"]})('

    out = LAUNCH.sub(rewrite, source)
    if "<<<" in out:
        raise ValueError(f"{filename}: a CUDA launch the emulation cannot rewrite remains")
    return f'#line 1 "{filename}"\n' + out, count
