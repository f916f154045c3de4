"""Fixed-capacity sample buffers (static shapes, no host sync per render) against the exactly sized path:
the same images and gradients, the same training run, and a step whose samples overflow the buffers
redone with grown buffers to the same result."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdream.cameras import orbit_cameras
from fastdream.config import RunConfig, apply_overrides
from fastdream.field import FieldConfig
from fastdream.renderer import RenderConfig, build_renderer
from fastdream.sample_buffer import SampleBuffer


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    from fastdream.demo import demo_scene

    path = tmp_path_factory.mktemp("scene") / "scene.npz"
    np.savez(path, **demo_scene(8))
    return path


def _renderer():
    torch.manual_seed(0)
    r = build_renderer(field_config=FieldConfig(n_levels=4, log2_hashmap_size=10, max_resolution=64, hidden_dim=16),
                       render_config=RenderConfig(samples_per_ray=64, chunk_rays=100), grid_resolution=16)
    r.field.encoding_params.data.uniform_(-0.5, 0.5)
    r.grid.binary[:8] = False  # half the box empty
    return r


def _render(r, cams, fixed):
    r.zero_grad()
    if fixed:
        with r.fixed_capacity():
            out = r.render(cams, shading="lambertian")
    else:
        out = r.render(cams, shading="lambertian")
    (out.rgb.square().sum() + out.opacity.sum() + out.normal.sum()).backward()
    return out, [p.grad.clone() for p in r.parameters() if p.grad is not None]


def test_fixed_capacity_render_equals_exact_render():
    """Padding and the fixed-shape compaction change nothing: the images are equal (the kept samples are the
    same, in the same order) and every parameter gradient is within float32 rounding; the kept count stays on
    the device."""
    r = _renderer()
    cams = orbit_cameras(2, 12, 12, elevation_deg=20, distance=3.0, fov_y_deg=40)
    exact, g_exact = _render(r, cams, fixed=False)
    _render(r, cams, fixed=True)  # calibrates the buffers from this render's counts
    buf = r.sample_buffer
    assert buf.calibrated and buf.kept >= exact.n_samples and buf.take() is None
    fixed, g_fixed = _render(r, cams, fixed=True)
    assert isinstance(fixed.n_samples, torch.Tensor) and int(fixed.n_samples) == exact.n_samples > 0
    assert fixed.rays.weights.shape == (buf.kept,) and bool((fixed.rays.weights[exact.n_samples:] == 0).all())
    for name in ("rgb", "opacity", "depth", "normal"):
        assert torch.equal(getattr(fixed, name), getattr(exact, name)), name
    assert len(g_fixed) == len(g_exact)
    for a, b in zip(g_fixed, g_exact):  # matmuls over more rows sum in another order: float32 rounding only
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    marched, kept = buf.take().tolist()
    assert kept == exact.n_samples and marched >= kept
    with torch.no_grad(), r.fixed_capacity():  # chunked rays (chunk_rays=100): the largest chunk's totals
        chunked = r.render(cams, shading="albedo")
    assert torch.allclose(chunked.rgb, r.render(cams, shading="albedo").rgb.detach(), atol=1e-6)
    assert buf.take()[1] < kept


def test_overflowing_buffers_report_the_totals_and_grow():
    r = _renderer()
    cams = orbit_cameras(1, 12, 12, elevation_deg=20, distance=3.0, fov_y_deg=40)
    with torch.no_grad():
        exact = r.render(cams).n_samples
    buf = r.sample_buffer
    buf.marched = buf.kept = 8  # far too small: samples are cut short, the totals say so
    with torch.no_grad(), r.fixed_capacity():
        r.render(cams)
    marched, kept = buf.take().tolist()
    assert marched > 8 and kept == 8  # only what fitted in the march buffer could be kept
    assert buf.settle((marched, kept)) and buf.grown == 1
    assert buf.marched >= 1.25 * marched and buf.kept == buf.size_for(8)
    with torch.no_grad(), r.fixed_capacity():  # the redo fits
        r.render(cams)
    assert not buf.settle(buf.take().tolist()) and buf.kept >= exact and buf.grown == 1


def test_sample_buffer_sizes():
    buf = SampleBuffer(headroom=1.25, first_headroom=2.0, shrink_below=0.4, shrink_window=3, granularity=1000)
    buf.calibrate(10_000, 3_000)
    assert (buf.marched, buf.kept) == (20_000, 6_000)            # the first sizing: more headroom
    assert not buf.settle((12_000, 3_900))                      # fits: unchanged
    assert (buf.marched, buf.kept) == (20_000, 6_000)
    assert buf.settle((20_001, 6_001)) and buf.grown == 1       # overflow: grows with headroom
    assert (buf.marched, buf.kept) == (26_000, 8_000)
    assert not buf.settle((5_000, 500))                         # end of the window, whose largest totals still
    assert (buf.marched, buf.kept) == (26_000, 8_000)           # fill the buffers: no shrink
    for _ in range(3):                                          # a whole window of small totals: shrink
        assert not buf.settle((5_000, 900))
    assert (buf.marched, buf.kept) == (7_000, 2_000)


def _trainer(tmp_path, scene, fixed: bool, steps: int = 6):
    from fastdream.guidance.reference import _configure_run as prepare_reference
    from fastdream.train import Trainer

    sets = [f"steps={steps}", "width=12", "height=12", "field.n_levels=4", "field.log2_hashmap_size=10",
            "field.max_resolution=64", "field.hidden_dim=16", "field.n_hidden_layers=1", "render.samples_per_ray=48",
            "grid.resolution=16", "grid.update_every=2", "grid.warmup_steps=2", "shading.albedo_only_fraction=0.3",
            "guidance.kind=reference", f"guidance.reference_scene={scene}", "guidance.reference_resolution=12",
            f"render.fixed_capacity={str(fixed).lower()}"]
    config = apply_overrides(RunConfig(prompt="scene", device="cpu", seed=3), sets)
    prepare_reference(config)
    return Trainer(config, tmp_path / ("fixed" if fixed else "exact"), quiet=True, device=torch.device("cpu"))


def test_fixed_capacity_training_equals_exact_training(tmp_path, tiny_scene):
    """Six steps (albedo, then lambertian/textureless; occupancy-grid updates every two steps) with fixed-capacity
    buffers against the exactly sized path: the same losses and parameters within 1e-5 (float sums over the
    same samples in the same order; the buffers only add zero-weight padding). On step 3 the buffers are
    shrunk to overflow: that step is redone with grown buffers and still gives the same result."""
    exact, fixed = _trainer(tmp_path, tiny_scene, False), _trainer(tmp_path, tiny_scene, True)
    assert exact.sample_buffer_renderers() == [] and len(fixed.sample_buffer_renderers()) == 2
    for step in range(6):
        if step == 3:
            fixed.renderer.sample_buffer.kept = 16
        a, b = exact.train_step(step), fixed.train_step(step)
        assert a["shading"] == b["shading"] and a["finite"] and b["finite"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), step
        for k in a["terms"]:
            assert b["terms"][k] == pytest.approx(a["terms"][k], rel=1e-5, abs=1e-7), (step, k)
        assert float(b["metrics"]["samples_per_ray"]) == pytest.approx(float(a["metrics"]["samples_per_ray"]))
    assert fixed.renderer.sample_buffer.grown == 1
    pa = [p for g in exact.optimizer.param_groups for p in g["params"]]
    pb = [p for g in fixed.optimizer.param_groups for p in g["params"]]
    for x, y in zip(pa, pb):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    assert torch.equal(exact.renderer.grid.binary, fixed.renderer.grid.binary)
    assert torch.equal(exact.generator.get_state(), fixed.generator.get_state())
