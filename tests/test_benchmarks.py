"""The benchmark suite runs (--quick, CPU), its JSON validates against benchmarks/schema.json, and the
report renders a table (and a plot when matplotlib is present) from sample JSON."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, report, run_all

jsonschema = pytest.importorskip("jsonschema")
ROOT = Path(__file__).resolve().parents[1]


def _sample(benchmark="ops", device="cpu"):
    class Args:
        quick = True

    Args.device = device
    results = []
    for backend, scale in (("native", 1.0), ("torch", 6.0)):
        for size in (2**14, 2**16, 2**18):
            timing = common.summarize([scale * size / 1e4, scale * size / 1e4 * 1.1, scale * size / 1e4 * 0.9])
            results.append(common.result_entry("hash_fwd_bwd", backend, size, "points", timing, work=size, work_unit="points"))
    results.append(common.result_entry("hash_fwd_bwd", "tinycudann", 2**14, "points", skipped="tinycudann not installed"))
    ratios = [common.ratio("hash fwd+bwd 2^18: native vs reference", results, "hash_fwd_bwd", "native", "torch", size=2**18)]
    targets = [common.target("cpu_hash", "CPU: native >= 5x reference on hash fwd+bwd", ratios[0]["value"], 5.0),
               common.target("gpu_hash_tcnn", "GPU: hash >= tcnn", None, 1.0, applies=False)]
    return common.make_result(benchmark, Args, {"sizes": [2**14, 2**16, 2**18]}, results, ratios, targets, notes=["sample"])


def test_timing_helper_and_sample_validate():
    t = common.time_fn(lambda: sum(range(1000)), "cpu", warmup=1, repeats=5)
    assert t["spread"]["repeats"] == 5 and t["spread"]["min_ms"] <= t["median_ms"] <= t["spread"]["max_ms"]
    assert t["memory_kind"] in ("cpu_rss_peak", "ru_maxrss")
    data = _sample()
    assert common.validate(data) == []
    assert data["ratios"][0]["value"] == pytest.approx(6.0)
    assert data["targets"][0]["met"] is True and data["targets"][1]["met"] is None
    env = data["env"]
    assert env["torch"] and env["cpu_count"] >= 1 and "active" in env["backend"]


def test_report_puts_overhead_files_side_by_side(tmp_path):
    """Two overhead_*.json (before and after a change): one table with ops, kernel ops, syncs and ms per step."""
    class Args:
        quick, device = False, "cpu"

    for name, (ops, syncs) in {"overhead_cpu_before.json": (900, 5), "overhead_cpu.json": (800, 1)}.items():
        timing = common.summarize([100.0, 110.0])
        entry = common.result_entry("train_step", "native/reference", 1, "steps", timing, work=1, work_unit="steps",
                                    guidance="reference", ops=ops, kernel_ops=ops // 2, host_syncs=syncs)
        common.write_json(common.make_result("overhead", Args, {}, [entry], [], []), tmp_path / name)
    assert report.main([str(tmp_path), "--no-plots"]) == 0
    text = (tmp_path / "README.md").read_text()
    table = text.split("## Overhead per train step, side by side")[1].split("##")[0]
    assert "| `overhead_cpu.json` |" in table and "| reference | 800 | 400 | 1 | 105 |" in table
    assert "| reference | 900 | 450 | 5 | 105 |" in table


def test_schema_rejects_broken_results():
    data = _sample()
    bad = copy.deepcopy(data)
    del bad["env"]
    assert common.validate(bad)
    bad = copy.deepcopy(data)
    bad["results"][0]["median_ms"] = None  # a missing time needs a reason
    bad["results"][0]["skipped"] = None
    assert common.validate(bad)
    bad = copy.deepcopy(data)
    bad["targets"][0]["met"] = "yes"
    assert common.validate(bad)


def test_report_renders_table_and_plot(tmp_path):
    common.write_json(_sample("ops"), tmp_path / "ops_cpu.json")
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a result file: ignored
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "## Headline" in text and "hash fwd+bwd 2^18: native vs reference" in text
    assert "6.00x" in text and "| met |" in text and "n/a" in text
    assert "tinycudann not installed" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text
    else:
        pngs = list(tmp_path.glob("*.png"))
        assert pngs and pngs[0].stat().st_size > 1000
        assert f"![{pngs[0].stem}]({pngs[0].name})" in text


def test_suite_quick_cpu(tmp_path):
    """python -m benchmarks --quick --device cpu on the cheapest scripts; every file validates."""
    argv = ["--device", "cpu", "--quick", "--out", str(tmp_path), "--only", "render,e2e", "--repeats", "1",
            "--warmup", "0"]
    rc = run_all.main(argv)
    files = sorted(tmp_path.glob("*_cpu.json"))
    assert {f.name for f in files} == {"render_cpu.json", "e2e_cpu.json"}
    for f in files:
        data = json.loads(f.read_text())
        assert common.validate(data) == [], f.name
        assert not data.get("error"), data.get("error")
        assert any(r["median_ms"] is not None for r in data["results"]), f.name
    render = json.loads((tmp_path / "render_cpu.json").read_text())
    measured = [r for r in render["results"] if r["median_ms"] is not None]
    assert all(r["extra"]["samples_per_ray"] > 1 for r in measured)  # a dense field, not an empty box
    assert (tmp_path / "README.md").is_file()
    assert rc == 0


def test_script_missing_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "SCRIPTS", run_all.SCRIPTS + ("nonexistent",))
    args = run_all.build_parser().parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert run_all.run_one("nonexistent", args) is None


def test_raster_benchmark_quick_cpu(tmp_path):
    """bench_raster times every backend present on an icosphere and its JSON validates."""
    from benchmarks import bench_raster

    out = tmp_path / "raster_cpu.json"
    assert bench_raster.main(["--device", "cpu", "--quick", "--resolutions", "32", "--subdivisions", "1",
                              "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert common.validate(data) == []
    measured = {r["backend"] for r in data["results"] if r["median_ms"] is not None}
    assert "reference" in measured
    assert all(r["extra"]["coverage_32px"] > 0.2 for r in data["results"] if r["median_ms"] is not None)


def test_mesh_benchmark_quick_cpu(tmp_path):
    """bench_mesh times DMTet extraction and render_mesh (forward + backward) and its JSON validates."""
    from benchmarks import bench_mesh

    out = tmp_path / "mesh_cpu.json"
    assert bench_mesh.main(["--device", "cpu", "--quick", "--tet-resolutions", "6", "--resolution", "24",
                            "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert common.validate(data) == []
    measured = {(r["name"], r["backend"]) for r in data["results"] if r["median_ms"] is not None}
    assert {("marching_tets_fwd_bwd", "torch"), ("mesh_step_fwd_bwd", "reference")} <= measured
    assert all(r["extra"]["faces"] > 0 for r in data["results"] if r["median_ms"] is not None)


def test_train_step_host_syncs_counted_and_bounded(tmp_path):
    """The real Trainer.train_step (reference guidance, 16x16, a grid-update step past the albedo warm-up)
    under bench_overhead's counter: with fixed-capacity sample buffers the only host sync left is the one
    readback of the loss, its terms, the finiteness verdict and the sample totals."""
    import torch

    from benchmarks import bench_overhead

    trainer = bench_overhead.build_trainer("reference", "cpu", tmp_path)
    trainer.config.width = trainer.config.height = 16
    assert trainer.optimizer.defaults["fused"]  # fused Adam: step counters stay on the device
    step = 16 * 64 - 1  # past the albedo warm-up, and (step + 1) % update_every == 0
    trainer.train_step(step - 1)  # calibrates the sample buffers (one exactly sized render each)
    counts = bench_overhead.count_steps(trainer, step, 1)
    assert counts["sync_ops"] == {"Tensor.tolist": 1}
    assert counts["max_syncs"] == 1 and counts["ops"] > 100

    trainer.config.render.fixed_capacity = False  # the exactly sized renders read their sizes on the host:
    counts = bench_overhead.count_steps(trainer, step, 1)  # the marched and the kept totals
    # of the run's render; the guidance's render of its reference scene is its network's (counted apart)
    assert counts["sync_ops"] == {"fastdream::march_rays": 1, "aten::_local_scalar_dense": 1, "Tensor.tolist": 1}
    assert counts["network_ops"] > 50

    counter = bench_overhead.OpCounter()  # the counter sees what the step no longer does
    x = torch.ones(4)
    with counter:
        float(x.sum()), x[x > 0], torch.nonzero(x), x.tolist()
    assert counter.syncs == 4 and set(counter.sync_ops) == {"aten::_local_scalar_dense", "aten::index",
                                                            "aten::nonzero", "Tensor.tolist"}


# The target for the default config's step (bench_overhead's): ops dispatched outside the UNet/VAE. The step dispatches 180
# (198 on a grid-update step) at any render size: the sample count does not change the op sequence.
ENGINE_OPS_BOUND = 250


def test_default_config_step_ops_and_syncs_bounded(tmp_path):
    """The default config's path (a diffusion model: the tiny test UNet/VAE) under bench_overhead's counter, on two
    steps past the albedo warm-up, the second one updating the occupancy grid: at most one host sync and at most
    ENGINE_OPS_BOUND ops outside the UNet/VAE per step. The VAE is called as vae.encode(x), which does not go through
    its forward: the counter still counts it, forward and backward, as the network's."""
    import torch

    from benchmarks import bench_overhead

    trainer = bench_overhead.build_trainer("tiny-sd", "cpu", tmp_path)
    trainer.config.width = trainer.config.height = 16
    step = 16 * 64 - 2  # past the albedo warm-up; (step + 2) % update_every == 0
    trainer.train_step(step - 1)  # calibrates the sample buffers
    counts = bench_overhead.count_steps(trainer, step, 2)
    assert counts["sync_ops"] == {"Tensor.tolist": 2} and counts["max_syncs"] == 1
    assert 150 < counts["max_ops"] <= ENGINE_OPS_BOUND, counts["steps"]
    assert counts["network_ops"] > 500

    g = trainer.guidance
    x = torch.rand(1, 3, g.resolution, g.resolution, requires_grad=True)
    counter = bench_overhead.OpCounter()
    with counter, counter.network(*bench_overhead.guidance_network(g)):
        g.vae.encode(x).latent_dist.mean.sum().backward()
    assert counter.network_ops > 50 and counter.ops <= 5, counter.by_op
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gpu_check_without_a_gpu_says_so_and_fails(tmp_path):
    """On a CPU-only machine the GPU check runs nothing, says there is no GPU and exits non-zero."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "no CUDA GPU" in run.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is False and report["steps"] == [] and "no CUDA GPU" in report["error"]


def test_gpu_check_plan_runs_the_sanitizers_when_present():
    from benchmarks.gpu_check import plan

    names = lambda steps: [s[0] for s in steps]  # noqa: E731
    assert names(plan("9.0", None, "b.json", quick=True)) == ["build", "tests", "step tests", "benchmarks", "overhead"]
    steps = plan("8.6", "/cuda/bin/compute-sanitizer", "b.json", quick=False, build=False)
    assert names(steps) == ["tests", "step tests", "memcheck", "racecheck", "benchmarks", "overhead"]
    assert steps[2][1][:3] == ["/cuda/bin/compute-sanitizer", "--tool", "memcheck"]
    assert "tests/test_step_capture.py" in steps[1][1] and "tests/test_step_capture.py" not in steps[2][1]
    assert "--quick" not in steps[-2][1] and steps[-2][1][-2:] == ["--json", "b.json"]
    assert steps[-1][1][-2:] == ["--json", "overhead_cuda.json"]


def test_committed_recipe_results_score_every_scene():
    """benchmarks/results/recipe_cpu.json (written by bench_recipe) validates and holds a score per scene."""
    from benchmarks import bench_recipe

    data = json.loads((ROOT / "benchmarks" / "results" / "recipe_cpu.json").read_text())
    assert common.validate(data) == [] and not data["quick"]
    scored = {r["extra"]["scene"]: r["extra"] for r in data["results"]}
    assert set(scored) == set(bench_recipe.SCENES)
    for r in scored.values():
        assert 0.0 <= r["iou"] <= 1.0 and r["psnr_db"] > 0 and r["steps"] == bench_recipe.RECON_STEPS
    assert scored["demo"]["iou"] >= 0.7 and scored["demo"]["psnr_db"] >= 18.0  # the reconstruction test's bounds


def test_bench_fit_without_its_dataset_writes_a_result_that_says_so(tmp_path):
    """The suite runs bench_fit too: without the capture it returns a valid result with the reason, not an exit."""
    from benchmarks import bench_fit, common

    args = bench_fit.build_parser().parse_args([str(tmp_path / "no-such-capture"), "--device", "cpu"])
    data = bench_fit.run(args)
    assert common.validate(data) == []
    assert data["results"] == [] and "no dataset at" in data["notes"][0]
    assert data["targets"][0]["met"] is None and data["targets"][0]["applies"] is False
