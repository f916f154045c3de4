"""`fastdream batch`: folders, resume rules, worker slots; and real batches of tiny reference-guidance runs
(CPU, a couple of steps each): killed midway and restarted, a failing prompt, and the Ray path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastdream import cli
from fastdream.batch import _local_slots, is_finished, prompt_folder_name, run_command
from fastdream.errors import FastDreamError

REPO = Path(__file__).resolve().parents[1]
TINY = ["width=16", "height=16", "field.n_levels=4", "field.log2_hashmap_size=12", "field.max_resolution=64",
        "field.hidden_dim=16", "grid.resolution=16", "render.samples_per_ray=48", "output.mesh=false",
        "output.video=false", "output.preview_views=1", "output.preview_resolution=16", "output.preview_every=0"]
GOOD = ["a red box", "a blue ball", "a green tree"]
BROKEN = "a prompt whose output folder is a file"


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from fastdream.demo import save_demo_scene

    return save_demo_scene(tmp_path_factory.mktemp("scene") / "scene.npz", resolution=24)


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    """The runs are subprocesses: make this checkout importable there even without `pip install -e`."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def batch_args(prompts_file, out, scene):
    args = ["batch", str(prompts_file), "--out", str(out), "--guidance", "reference", "--reference-scene", str(scene),
            "--steps", "2", "--device", "cpu", "--run-arg=--quiet"]
    for s in TINY:
        args += ["--set", s]
    return args


def read_summary(out):
    data = json.loads((Path(out) / "summary.json").read_text())
    return data, {p["prompt"]: p for p in data["prompts"]}


def _status(out, prompt):
    try:
        return read_summary(out)[1][prompt]["status"]
    except (OSError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------------------------------------- units

def test_folder_names_are_stable_and_distinct():
    a, b = prompt_folder_name("A corgi, wearing a hat!"), prompt_folder_name("a corgi wearing a hat")
    assert a.startswith("a-corgi-wearing-a-hat-") and a != b and a == prompt_folder_name("A corgi, wearing a hat!")
    assert len(prompt_folder_name("x" * 500)) <= 60 + 9
    assert prompt_folder_name("???").startswith("prompt-")


def test_run_command_resumes_or_restarts(tmp_path):
    folder = tmp_path / "run"
    assert run_command("p", folder, ["--steps", "3"])[-4:] == ["--out", str(folder), "--steps", "3"]
    folder.mkdir()
    assert "--resume" not in run_command("p", folder, []) and "--force" not in run_command("p", folder, [])
    (folder / "config.yaml").write_text("prompt: p\n")
    assert "--force" in run_command("p", folder, [])
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "step_0000010.pt").write_bytes(b"x")
    cmd = run_command("p", folder, [])
    assert "--resume" in cmd and "--force" not in cmd
    assert not is_finished(folder)
    (folder / "metrics.json").write_text("{}")
    assert is_finished(folder)


def test_local_slots(monkeypatch):
    assert _local_slots("0,2", None, None) == ["0", "2"]
    assert _local_slots("1", 2, None) == ["1", "1"]
    assert _local_slots(None, None, "cpu") == [None]
    assert _local_slots("none", 3, None) == [None, None, None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert _local_slots(None, None, None) == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _local_slots(None, None, None) == [None]
    with pytest.raises(FastDreamError, match="--gpus"):
        _local_slots("zero", None, None)
    with pytest.raises(FastDreamError, match="--gpus"):
        _local_slots(None, None, "cuda:1")


def test_missing_ray_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    (tmp_path / "p.txt").write_text("a red box\n")
    rc = cli.main(["batch", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--ray", "local"])
    assert rc == 2 and "fastdream[cluster]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real batches

def test_batch_killed_restarted_and_a_failing_prompt(scene, tmp_path, capsys):
    """3 prompts (+1 that fails): kill the batch once the first prompt has finished, then rerun it: the
    finished prompt is skipped (not rerun), the rest finish, the failure is reported with its error."""
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([GOOD[0], BROKEN, GOOD[1], GOOD[2]]) + "\n")
    out.mkdir()
    (out / prompt_folder_name(BROKEN)).write_text("not a folder")  # `fastdream run --out` there must fail

    first = out / prompt_folder_name(GOOD[0])
    proc = subprocess.Popen([sys.executable, "-m", "fastdream.cli", *batch_args(prompts, out, scene)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (is_finished(first) and _status(out, GOOD[0]) == "done"):
            assert proc.poll() is None, "the batch ended before its first prompt finished"
            assert time.time() < deadline, "the first prompt did not finish in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole batch dies at once, like a lost machine
        proc.wait()
    stamp = (first / "metrics.json").stat().st_mtime_ns
    data, by_prompt = read_summary(out)
    assert by_prompt[GOOD[0]]["status"] == "done" and not data["finished"]
    assert not all(is_finished(out / prompt_folder_name(p)) for p in GOOD)

    time.sleep(0.5)  # children die with the batch (PDEATHSIG); let them go
    rc = cli.main(batch_args(prompts, out, scene))
    printed = capsys.readouterr().out
    assert rc == 1  # one prompt failed
    data, by_prompt = read_summary(out)
    assert data["finished"] and data["mode"] == "local" and data["counts"] == {"skipped": 1, "done": 2, "failed": 1}
    assert by_prompt[GOOD[0]]["status"] == "skipped"
    assert (first / "metrics.json").stat().st_mtime_ns == stamp  # not rerun
    for p in GOOD:
        folder = out / prompt_folder_name(p)
        assert is_finished(folder) and (folder / "config.yaml").is_file() and any((folder / "checkpoints").glob("step_*.pt"))
        assert json.loads((folder / "metrics.json").read_text())["prompt"] == p
    for p in GOOD[1:]:
        assert by_prompt[p]["status"] == "done" and by_prompt[p]["seconds"] > 0 and by_prompt[p]["error"] is None
    broken = by_prompt[BROKEN]
    assert broken["status"] == "failed" and broken["returncode"] not in (0, None) and broken["error"]
    assert Path(broken["log"]).is_file() and "is a file, not a folder" in broken["error"]
    assert "failed" in printed and BROKEN in printed and "other options" not in printed
    # the index page: one card per prompt, linking to each finished run's report
    html = (out / "index.html").read_text()
    cards = json.loads(html.split('<script id="fd-data" type="application/json">', 1)[1].split("</script>", 1)[0]
                       .replace("<\\/", "</"))["cards"]
    assert {c["prompt"]: c["status"] for c in cards} == {r["prompt"]: r["status"] for r in data["prompts"]}
    for c in cards:
        if c["status"] in ("done", "skipped"):
            assert (out / c["href"]).is_file() and c["href"].endswith("/report.html")

    # run again with other options: the finished prompts are still not overwritten, and the batch says why
    args = batch_args(prompts, out, scene)
    args[args.index("--steps") + 1] = "3"
    assert cli.main(args + ["--set", "optim.lr_mlp=0.002"]) == 1
    printed = capsys.readouterr().out
    assert printed.count("finished earlier with other options") == 3
    assert "steps: 2 -> 3" in printed and "optim.lr_mlp: 0.001 -> 0.002" in printed
    assert (first / "metrics.json").stat().st_mtime_ns == stamp
    assert read_summary(out)[1][GOOD[0]]["changed"] == ["steps: 2 -> 3", "optim.lr_mlp: 0.001 -> 0.002"]


def test_batch_on_ray(scene, tmp_path):
    ray = pytest.importorskip("ray")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([GOOD[0], GOOD[1], BROKEN]) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / prompt_folder_name(BROKEN)).write_text("not a folder")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rc = cli.main(batch_args(prompts, out, scene) + ["--ray", "local"])
    finally:
        ray.shutdown()
    assert rc == 1
    data, by_prompt = read_summary(out)
    assert data["mode"] == "ray" and data["ray"]["task_resources"] == {"num_cpus": 1.0}
    assert data["counts"] == {"done": 2, "failed": 1}
    for p in GOOD[:2]:
        assert is_finished(out / prompt_folder_name(p)) and by_prompt[p]["worker"].endswith(":cpu")
    assert by_prompt[BROKEN]["status"] == "failed" and by_prompt[BROKEN]["error"]
