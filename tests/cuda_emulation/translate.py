"""Rewrites each CUDA launch `K<<<cfg>>>(args)` of a .cu file into
`::cudaemu::launch_at("K", __LINE__, K, cfg)(args)` (see shim/emulated_cuda.h), keeping line numbers."""
from __future__ import annotations

import re

# kernel name, optional template arguments (one level of nesting: K<F, S, Acc<P>>), <<<config>>>(
LAUNCH = re.compile(r"(?P<k>[A-Za-z_][\w:]*(?:<(?:[^<>;()]|<[^<>;()]*>)*>)?)<<<(?P<cfg>[^\n]*?)>>>\(")


def translate(source: str, filename: str) -> tuple[str, int]:
    """(host C++ text, number of launches rewritten). Raises ValueError on a launch it cannot parse."""
    count = 0

    def rewrite(m: re.Match) -> str:
        nonlocal count
        count += 1
        return f'::cudaemu::launch_at("{m["k"]}", __LINE__, {m["k"]}, {m["cfg"]})('

    out = LAUNCH.sub(rewrite, source)
    if "<<<" in out:
        raise ValueError(f"{filename}: a CUDA launch the emulation cannot rewrite remains")
    return f'#line 1 "{filename}"\n' + out, count
