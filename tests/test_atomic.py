"""Atomic writes (fastdream.atomic) and checkpoint digests: a failed or killed write never replaces good data."""
import errno
import os

import pytest
import torch

from fastdream import atomic
from fastdream.checkpoint import load_checkpoint, save_checkpoint
from fastdream.errors import FastDreamError


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "mesh.obj"
    target.write_text("good")
    with pytest.raises(FastDreamError, match="No space left on device") as info:
        with atomic.atomic_open(target, "w") as f:
            f.write("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "mesh.obj" in str(info.value) and "untouched" in str(info.value)
    assert target.read_text() == "good" and os.listdir(tmp_path) == ["mesh.obj"]
    atomic.write_text(target, "better")
    assert target.read_text() == "better" and os.listdir(tmp_path) == ["mesh.obj"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # the usual permissions, not mkstemp's


def test_a_group_is_replaced_only_when_every_file_was_written(tmp_path):
    paths = {k: tmp_path / f"mesh.{k}" for k in ("obj", "ply")}
    for p in paths.values():
        p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.temporary_paths(paths) as tmp:
            tmp["obj"].write_text("new")
            raise RuntimeError("the PLY writer failed")
    assert all(p.read_text() == "old" for p in paths.values()) and len(os.listdir(tmp_path)) == 2
    with atomic.temporary_paths(paths) as tmp:
        for p in tmp.values():
            p.write_text("new")
    assert all(p.read_text() == "new" for p in paths.values()) and len(os.listdir(tmp_path)) == 2


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    # what a SIGKILL in the middle of temporary_path leaves, and the older checkpoint writer's naming
    for name in ("step_0000002.pt.k3j_x9a0.tmp.pt", "mesh.obj.abcdefgh.tmp.obj", "step_0000001.pt.abcd1234.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    for name in ("notes.tmp", "step_0000001.pt", "my.tmp.txt"):
        (tmp_path / name).write_text("user")
    assert atomic.remove_stale_temporaries([tmp_path, tmp_path / "missing"]) == 3
    assert sorted(os.listdir(tmp_path)) == ["my.tmp.txt", "notes.tmp", "step_0000001.pt"]


def test_checkpoint_digest_catches_a_flipped_byte(tmp_path):
    params = torch.arange(4096, dtype=torch.float32)
    path = save_checkpoint(tmp_path / "c.pt", {"kind": "run", "step": 1, "w": params})
    assert torch.equal(load_checkpoint(path, kind="run")["w"], params)
    raw = bytearray(path.read_bytes())
    at = raw.find(params[1000:1016].numpy().tobytes())
    assert at > 0
    raw[at + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(FastDreamError, match="corrupt: its tensors do not match the digest"):
        load_checkpoint(path)


def test_checkpoints_without_a_digest_still_load(tmp_path, caplog):
    path = tmp_path / "old.pt"
    torch.save({"format_version": 1, "kind": "run", "step": 3, "w": torch.ones(3)}, path)
    with caplog.at_level("INFO", logger="fastdream"):
        assert load_checkpoint(path, kind="run")["step"] == 3
    assert "no digest" in caplog.text
