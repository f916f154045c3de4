"""fastdream's benchmark suite: speed side by side (native vs PyTorch reference vs tiny-cuda-nn /
nerfacc), one command for all of it:

    python -m benchmarks [--device cpu|cuda] [--quick] [--out DIR] [--only ops,render,iteration,e2e,sds]
    python -m benchmarks.report          # results/*.json -> results/README.md table + PNG plots

Each ``bench_<name>.py`` also runs alone (``python -m benchmarks.bench_render --json out.json``) and
exposes ``build_parser()`` and ``run(args) -> dict``; shared helpers live in ``common``, the result
format in ``schema.json``.
"""
