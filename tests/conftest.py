"""Shared fixtures. Keep them small and fast: the whole CI suite runs on two CPU cores."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import os

import numpy as np
import pytest


def pytest_configure(config):
    # Under pytest-xdist each worker gets its share of the cores: torch's default of one thread per
    # core in every worker oversubscribes a small machine and slows everything down several-fold.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def write_nerf_dataset(folder, n_frames: int = 4, width: int = 8, height: int = 6, intrinsics: str = "angle",
                       split: Optional[str] = None, rgba: bool = True, seed: int = 0, extra: Optional[dict] = None,
                       extension: bool = False) -> Path:
    """Write a tiny NeRF-format dataset: random RGBA (or RGB) PNGs and orbit poses.

    intrinsics: "angle" (camera_angle_x) or "focal" (fl_x, fl_y, cx, cy, w, h).
    split: None writes transforms.json; "train"/"test"/"val" writes transforms_<split>.json and <split>/r_*.png.
    extension: whether file_path carries ".png" (NeRF-synthetic omits it).
    """
    from PIL import Image

    import torch
    from fastdream.cameras import orbit_c2w

    folder = Path(folder)
    sub = split or "images"
    (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    c2w = orbit_c2w(torch.full((n_frames,), 20.0), torch.arange(n_frames, dtype=torch.float32) * 360.0 / n_frames,
                    torch.full((n_frames,), 3.0))
    frames = []
    for k in range(n_frames):
        channels = 4 if rgba else 3
        pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        Image.fromarray(pixels, mode="RGBA" if rgba else "RGB").save(folder / sub / f"r_{k}.png")
        name = f"./{sub}/r_{k}" + (".png" if extension else "")
        frames.append({"file_path": name, "transform_matrix": c2w[k].tolist()})
    meta = {"frames": frames}
    if intrinsics == "angle":
        meta["camera_angle_x"] = 0.8
    elif intrinsics == "focal":
        meta.update({"fl_x": 10.0, "fl_y": 11.0, "cx": 3.5, "cy": 2.5, "w": width, "h": height})
    else:
        raise ValueError(intrinsics)
    meta.update(extra or {})
    name = "transforms.json" if split is None else f"transforms_{split}.json"
    with open(folder / name, "w") as f:
        json.dump(meta, f)
    return folder


@pytest.fixture
def nerf_dataset(tmp_path):
    """Factory: nerf_dataset(**kwargs) -> folder with a tiny dataset (see write_nerf_dataset)."""
    counter = iter(range(1000))

    def make(folder=None, **kwargs):
        return write_nerf_dataset(folder or tmp_path / f"data{next(counter)}", **kwargs)

    return make


@pytest.fixture(scope="session")
def demo_fit_run(tmp_path_factory):
    """`fastdream fit --demo` run once per session through the CLI: (exit code, out folder).
    The slowest fixture here (about a minute on two cores); share it rather than fitting again."""
    from fastdream.cli import main

    out = tmp_path_factory.mktemp("fit_demo") / "out"
    code = main(["fit", "--demo", "--out", str(out), "--no-progress"])
    return code, out


@pytest.fixture(scope="session")
def demo_scene_npz(tmp_path_factory) -> Path:
    """The demo scene (fastdream.demo) as an .npz with density (D,D,D), albedo (D,D,D,3), aabb (6,)."""
    from fastdream.demo import save_demo_scene

    return save_demo_scene(tmp_path_factory.mktemp("scene") / "scene.npz", resolution=32)


def psnr(a, b) -> float:
    mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else -10 * math.log10(mse)
