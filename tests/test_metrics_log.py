"""metrics.jsonl (buffered: one readback per window), resume keeps one row per step, and progress that
prints plain lines, not carriage-return frames, when stderr is not a terminal."""
import logging

import pytest
import torch

from fastdream import train
from fastdream.ops import SHADING_MODES
from fastdream.cli import main
from fastdream.metrics_log import MetricsLog, read_metrics
from fastdream.progress import LineProgress, progress

from test_run import NO_OUTPUTS, _ref_args, scene_path  # noqa: F401  (fixture)

KEYS = {"step", "time", "loss", "loss_sds", "sds_grad_norm", "t", "shading", "occupancy", "samples_per_ray", "skipped"}


def test_metrics_are_read_back_once_per_window(tmp_path, monkeypatch):
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or real(self))
    mlog = MetricsLog(tmp_path, flush_every=4)
    for step in range(1, 11):
        mlog.record({"step": step}, {"loss": torch.tensor(float(step)), "t": torch.tensor(0.5)})
    assert len(calls) == 2 and len(read_metrics(tmp_path / "metrics.jsonl")) == 8
    mlog.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(calls) == 3 and [r["step"] for r in rows] == list(range(1, 11))
    assert [r["loss"] for r in rows] == [float(s) for s in range(1, 11)]


def test_run_writes_metrics_jsonl_and_resume_keeps_one_row_per_step(tmp_path, scene_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"

    def stop_at_3(trainer, step):
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_on_step", stop_at_3)
    assert main(_ref_args(scene_path, out, 6, *NO_OUTPUTS, "output.metrics_every=2")) == 130
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    monkeypatch.setattr(train, "_on_step", lambda trainer, step: None)
    assert main(_ref_args(scene_path, out, 6, *NO_OUTPUTS, "output.metrics_every=4", extra=["--resume"])) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert KEYS <= set(r), set(r)
        assert r["shading"] in SHADING_MODES and 0 < r["occupancy"] <= 1 and r["samples_per_ray"] > 0
        assert r["sds_grad_norm"] >= 0 and r["loss"] is not None
    assert rows[-1]["time"] >= rows[0]["time"] > 0


def test_non_tty_run_logs_plain_lines(tmp_path, scene_path, capsys, caplog):  # noqa: F811
    args = [a for a in _ref_args(scene_path, tmp_path / "run", 6, *NO_OUTPUTS, "output.log_every=2") if a != "--quiet"]
    with caplog.at_level(logging.INFO, logger="fastdream"):
        assert main(args) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [m for m in caplog.messages if m.startswith("step ") and "/6" in m]
    assert [m.split()[1] for m in lines] == ["2/6", "4/6", "6/6"], lines
    assert all("ETA" in m for m in lines)


def test_progress_is_tqdm_on_a_terminal_and_lines_otherwise():
    class Tty:
        def isatty(self):
            return True

        def write(self, s):
            pass

        def flush(self):
            pass

    assert not isinstance(progress(10, "x", stream=Tty()), LineProgress)
    bar = progress(10, "x", every=3)
    assert isinstance(bar, LineProgress) and bar.every == 3


def test_export_phases_show_progress_with_eta(tmp_path, scene_path, caplog):  # noqa: F811
    out = tmp_path / "run"
    assert main(_ref_args(scene_path, out, 2, *NO_OUTPUTS)) == 0
    with caplog.at_level(logging.INFO, logger="fastdream"):
        assert main(["export", str(out), "--device", "cpu", "--video-frames", "16", "--mesh-resolution", "32",
                     "--set", "output.mesh=true", "--set", "output.video=true"]) == 0
    for phase in ("density grid", "turntable (albedo)", "turntable (textureless)"):
        lines = [m for m in caplog.messages if m.startswith(phase)]
        assert lines and "ETA" in lines[-1], (phase, caplog.messages)
    assert any(m.startswith("turntable (albedo) 16/16") for m in caplog.messages)


def test_tensorboard_gets_the_same_scalars(tmp_path, scene_path):  # noqa: F811
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'fastdream[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_ref_args(scene_path, out, 4, *NO_OUTPUTS, "output.tensorboard=true", "output.metrics_every=3")) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = read_metrics(out / "metrics.jsonl")
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert {"train/sds_grad_norm", "train/t", "train/occupancy", "train/samples_per_ray"} <= set(events.Tags()["scalars"])
