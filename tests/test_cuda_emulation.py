"""The CUDA launchers and kernels (csrc/cuda/*.cu and the csrc headers they include, unmodified: also the
volume-rendering launchers shared with the CPU, whose CUDA branch launches fastdream/parallel_for.h's
kernel) run on the CPU through the emulation in tests/cuda_emulation/ and are compared with the CPU ops
(torch.ops.fastdream.*).

Bit-equal where both sides do the same float operations in the same order (forward outputs, dL/dx,
marching, the occupancy update, compositing); parameter gradients, which CUDA sums with atomics in
another order, within a few times the CPU op's own error against a float64 truth. What this cannot
show (races, device floating point, speed) is listed in tests/cuda_emulation/README.md.
The library is built once per session (about a minute on two cores, cached under build/); the tests
skip only when no C++ compiler exists, and FASTDREAM_REQUIRE_NATIVE=1 (CI) turns that into a failure.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastdream import _backend
from fastdream.ops import hash_grid_layout
from fastdream.ops._native import layout_args, ray_offsets
from fastdream.ops.rasterization import triangle_adjacency

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cuda_emulation"
RASTER = ["rasterize_fwd", "rasterize_bwd", "interpolate_fwd", "interpolate_bwd", "antialias_fwd", "antialias_bwd"]
OPS = ["hash_encode_fwd", "hash_encode_bwd", "hash_encode_bwd_bwd", "march_rays", "march_rays_fixed",
       "compact_visible_samples", "occupancy_update",
       "render_weights_fwd", "render_weights_bwd", "composite_fwd", "composite_bwd", "orbit_cameras", "camera_rays",
       "frequency_encode", *RASTER]
CPU = torch.ops.fastdream


def _unavailable(reason: str):
    if os.environ.get("FASTDREAM_REQUIRE_NATIVE") == "1":
        pytest.fail(f"FASTDREAM_REQUIRE_NATIVE=1 but the emulated CUDA tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def EMU():
    from cuda_emulation.build import build, compiler_available

    if _backend.extension() is None:
        _unavailable(f"native extension not built ({_backend.extension_error()})")
    if not compiler_available():
        _unavailable("no C++ compiler to build the emulated CUDA launchers")
    build(BUILD / "all")
    return torch.ops.fastdream_cudaemu


def test_launcher_signatures_match_schemas(EMU):
    """The launchers' C++ signatures (schema inferred by the emulation) against ops.cpp's schemas."""
    for name in OPS:
        want, got = getattr(CPU, name).default._schema, getattr(EMU, name).default._schema
        assert [str(a.type) for a in want.arguments] == [str(a.type) for a in got.arguments], name
        assert [str(r.type) for r in want.returns] == [str(r.type) for r in got.returns], name


HASH = [dict(n_levels=3, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4),
        dict(n_levels=4, n_features_per_level=1, log2_hashmap_size=10, base_resolution=3, per_level_scale=1.7),
        dict(n_levels=2, n_features_per_level=4, log2_hashmap_size=6, base_resolution=5, per_level_scale=2.3),
        dict(n_levels=2, n_features_per_level=8, log2_hashmap_size=7, base_resolution=2),
        dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=12)]


def _close_to_truth(emu, cpu, truth):
    """Atomics sum in another order: the error against float64 no worse than a few times the CPU op's."""
    e, c = (emu.double() - truth).abs().max().item(), (cpu.double() - truth).abs().max().item()
    assert e <= 4 * c + 1e-7 * truth.abs().max().item(), (e, c)


def _points(n, dtype, seed=0):
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0], x[1] = 0.0, 1.0
    return x.to(dtype)


@pytest.mark.parametrize("cfg", HASH, ids=lambda c: f"L{c['n_levels']}F{c['n_features_per_level']}")
@pytest.mark.parametrize("dt", ["f32", "f32-half-params", "f64"])
def test_hash_encoding(EMU, cfg, dt):
    lay = hash_grid_layout(**cfg)
    args = layout_args(lay)
    xdt = torch.float64 if dt == "f64" else torch.float32
    pdt = {"f32": torch.float32, "f32-half-params": torch.float16, "f64": torch.float64}[dt]
    g = torch.Generator().manual_seed(1)
    x = _points(1000, xdt)
    p = (torch.randn(lay.n_params, generator=g, dtype=torch.float64) * 0.1).to(pdt)
    y_c, y_e = CPU.hash_encode_fwd(x, p, *args), EMU.hash_encode_fwd(x, p, *args)
    assert y_e.dtype == y_c.dtype and torch.equal(y_e, y_c)
    gy = torch.randn(y_c.shape, generator=g, dtype=torch.float64).to(xdt)
    gp_c, gx_c = CPU.hash_encode_bwd(gy, x, p, *args, True, True)
    gp_e, gx_e = EMU.hash_encode_bwd(gy, x, p, *args, True, True)
    assert gp_e.dtype == gp_c.dtype == p.dtype and gx_e.dtype == gx_c.dtype
    assert torch.equal(gx_e, gx_c)
    xd, pd, gyd = x.double(), p.double(), gy.double()
    _close_to_truth(gp_e, gp_c, CPU.hash_encode_bwd(gyd, xd, pd, *args, True, False)[0])
    ggx = torch.randn(x.shape, generator=g, dtype=torch.float64).to(xdt)
    ggy_c, gp2_c, gx2_c = CPU.hash_encode_bwd_bwd(ggx, gy, x, p, *args, True, True)
    ggy_e, gp2_e, gx2_e = EMU.hash_encode_bwd_bwd(ggx, gy, x, p, *args, True, True)
    assert torch.equal(ggy_e, ggy_c) and torch.equal(gx2_e, gx2_c)
    _close_to_truth(gp2_e, gp2_c, CPU.hash_encode_bwd_bwd(ggx.double(), gyd, xd, pd, *args, True, False)[1])
    for need_p, need_x in [(False, True), (True, False)]:  # flags off: same shapes as the CPU op
        a, b = CPU.hash_encode_bwd(gy, x, p, *args, need_p, need_x), EMU.hash_encode_bwd(gy, x, p, *args, need_p, need_x)
        assert [t.shape for t in a] == [t.shape for t in b]


def test_half_params_gradient_keeps_contributions_below_half_resolution(EMU):
    """Each contribution (1e-8 * weight) is below half's smallest subnormal (6e-8); their sum is not. The
    gradient is summed in float and rounded once, as on the CPU, so the sum survives."""
    lay = hash_grid_layout(n_levels=1, n_features_per_level=2, log2_hashmap_size=6, base_resolution=4)
    args = layout_args(lay)
    x = torch.full((2000, 3), 0.3)
    p = torch.zeros(lay.n_params, dtype=torch.float16)
    gy = torch.full((2000, 2), 1e-8)
    for bwd in (lambda op: op.hash_encode_bwd(gy, x, p, *args, True, False)[0],
                lambda op: op.hash_encode_bwd_bwd(torch.ones(2000, 3), gy, x, p, *args, True, False)[1]):
        cpu, emu = bwd(CPU), bwd(EMU)
        assert emu.dtype == torch.float16 and int((cpu != 0).sum()) >= 8
        torch.testing.assert_close(emu.float(), cpu.float(), rtol=1e-3, atol=0)


def test_atomic_ops_report_nondeterminism(EMU):
    lay = hash_grid_layout(n_levels=2, log2_hashmap_size=6)
    args, x = layout_args(lay), _points(10, torch.float32)
    p, gy = torch.zeros(lay.n_params), torch.ones(10, 2 * lay.n_features_per_level)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="hash_encode_bwd .*does not have a deterministic"):
            EMU.hash_encode_bwd(gy, x, p, *args, True, False)
        with pytest.raises(RuntimeError, match="hash_encode_bwd_bwd .*does not have a deterministic"):
            EMU.hash_encode_bwd_bwd(torch.ones(10, 3), gy, x, p, *args, True, False)
        EMU.hash_encode_bwd(gy, x, p, *args, False, True)  # dL/dx alone has no atomics
        CPU.hash_encode_bwd(gy, x, p, *args, True, True)  # the CPU op is deterministic
    finally:
        torch.use_deterministic_algorithms(was)


def _rays(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = (torch.rand(n, 3, generator=g) * 2 - 1) * 2.5
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    d[: n // 2] = torch.nn.functional.normalize(-o[: n // 2] + 0.3 * torch.randn(n // 2, 3, generator=g), dim=-1)
    o[0], d[0] = torch.tensor([-2.0, 0.1, 0.2]), torch.tensor([1.0, 0, 0])
    o[1], d[1] = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0, 0, 1.0])
    return o.to(dtype), d.to(dtype)


MARCH_CASES = [dict(step_size=0.05), dict(step_size=0.02, cone_angle=0.01),
               dict(step_size=0.01, cone_angle=0.05, max_step_size=0.08),
               dict(step_size=0.03, near=1.5, far=3.0), dict(step_size=0.05, near=4.0, far=3.0)]


def _march_args(case, shape, dtype):
    o, d = _rays(700, dtype)
    aabb = torch.tensor([-1.0, -1, -1, 1, 1, 1], dtype=dtype)
    binary = torch.rand(shape, generator=torch.Generator().manual_seed(5)) > 0.7
    kw = {**dict(near=0.0, far=1e10, cone_angle=0.0, max_step_size=1e10), **case}
    return o, d, aabb, binary, kw["near"], kw["far"], kw["step_size"], kw["cone_angle"], kw["max_step_size"]


@pytest.mark.parametrize("case", MARCH_CASES)
@pytest.mark.parametrize("shape", [(16, 16, 16), (5, 7, 3), (40, 9, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_march(EMU, case, shape, dtype):
    args = _march_args(case, shape, dtype)
    for u, v in zip(CPU.march_rays(*args), EMU.march_rays(*args)):
        assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.mark.parametrize("case", MARCH_CASES[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_march_fixed_capacity(EMU, case, dtype):
    """Count, scan, capped fill and device-side padding against the CPU's one pass, below, at and above the total."""
    args = _march_args(case, (16, 16, 16), dtype)
    total = CPU.march_rays(*args)[0].numel()
    for capacity in (0, 1, total // 3, total, total + 1000):
        cpu, emu = CPU.march_rays_fixed(*args, capacity), EMU.march_rays_fixed(*args, capacity)
        assert int(cpu[3]) == int(emu[3]) == total
        for u, v in zip(cpu, emu):
            assert u.dtype == v.dtype and torch.equal(u, v), capacity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_occupancy_update(EMU, dtype):
    g = torch.Generator().manual_seed(3)
    occ = torch.rand(4096, generator=g, dtype=dtype)
    idx = torch.randint(0, 4096, (20000,), generator=g)  # many duplicates: the CAS max races
    est = torch.rand(20000, generator=g, dtype=dtype) * 1.2
    est[::97], est[5::89], est[7::83] = float("nan"), float("inf"), -float("inf")
    a, b = CPU.occupancy_update(occ, idx, est, 0.95, 0.5), EMU.occupancy_update(occ, idx, est, 0.95, 0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_occupancy_update_keeps_nan_cells_and_rejects_bad_indices(EMU, dtype):
    """One semantics on both devices (march::estimate_raises_cell and the launcher's index check)."""
    occ = torch.tensor([float("nan"), 0.2, 0.4, 0.0], dtype=dtype)
    idx, est = torch.tensor([0, 1, 2, 3]), torch.tensor([0.9, 0.7, float("nan"), float("inf")], dtype=dtype)
    for op in (CPU, EMU):
        upd, _ = op.occupancy_update(occ, idx, est, 1.0, 0.5)
        assert torch.allclose(upd, torch.tensor([float("nan"), 0.7, 0.4, 0.0], dtype=dtype), equal_nan=True)
        for bad in (torch.tensor([1, 4]), torch.tensor([-1, 2])):
            with pytest.raises(RuntimeError, match="out of range"):
                op.occupancy_update(occ, bad, est[:2], 1.0, 0.5)


def _one_op_call_per_op():
    """(name, args) for every op, all tensors on the CPU."""
    lay = hash_grid_layout(n_levels=2, log2_hashmap_size=6)
    la, x = layout_args(lay), _points(8, torch.float32)
    p, gy = torch.zeros(lay.n_params), torch.ones(8, 2 * lay.n_features_per_level)
    ts, te, sig, off, _ = _packed(4, torch.float32)
    n, r = sig.numel(), off.numel() - 1
    v3, v1 = torch.ones(r, 3), torch.ones(r)
    fa = (ts, te, off, sig, torch.ones(n, 3), torch.ones(n, 3), v3, v3, v3, v1, v1, 1)
    fwd = CPU.composite_fwd(*fa)
    rw = CPU.render_weights_fwd(ts, te, sig, off)
    return [("hash_encode_fwd", (x, p, *la)), ("hash_encode_bwd", (gy, x, p, *la, True, True)),
            ("hash_encode_bwd_bwd", (torch.ones(8, 3), gy, x, p, *la, True, True)),
            ("march_rays", (*_march_args(MARCH_CASES[0], (4, 4, 4), torch.float32),)),
            ("march_rays_fixed", (*_march_args(MARCH_CASES[0], (4, 4, 4), torch.float32), 64)),
            ("compact_visible_samples", (*_compact_args(torch.float32, n_rays=6)[:5], 6, 1e-4, 0.0, 40)),
            ("occupancy_update", (torch.zeros(8), torch.tensor([1]), torch.ones(1), 0.9, 0.5)),
            ("render_weights_fwd", (ts, te, sig, off)),
            ("render_weights_bwd", (torch.ones(n), None, None, ts, te, sig, off, rw[1], rw[2])),
            ("composite_fwd", fa),
            ("composite_bwd", (*[torch.ones_like(t) for t in fwd[:4]], None, *fa[:-1], *fwd, 1, True)),
            *_camera_calls(torch.float32),
            ("frequency_encode", (_points(8, torch.float32), 4)),
            *_raster_calls(torch.float32)]


def _camera_calls(dtype, n_cameras=3, height=5, width=7):
    """One call of each camera op: orbit cameras from test_native_ops' draws, then their rays."""
    from test_native_ops import _camera_draws

    orbit = ("orbit_cameras", (*_camera_draws(n_cameras, dtype), width, height, 0.5, True))
    c2w, fx, fy, cx, cy, _, _, _, light, intensity, ambient = CPU.orbit_cameras(*orbit[1])
    return [orbit, ("camera_rays", (c2w, fx, fy, cx, cy, light, intensity, ambient, height, width))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frequency_encode(EMU, dtype):
    """One thread per point, 300 points (three blocks): bit-equal to the CPU op."""
    x = _points(300, dtype) * 4 - 2
    for n_frequencies in (0, 4):
        cpu, emu = CPU.frequency_encode(x, n_frequencies), EMU.frequency_encode(x, n_frequencies)
        assert cpu.dtype == emu.dtype == dtype and torch.equal(cpu, emu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_camera_ops(EMU, dtype):
    """orbit_cameras (one thread per camera, 300 cameras: three blocks) and camera_rays (one per pixel) equal
    the CPU ops bit for bit."""
    for name, args in _camera_calls(dtype, n_cameras=300, height=3, width=4):
        cpu, emu = getattr(CPU, name)(*args), getattr(EMU, name)(*args)
        assert len(cpu) == len(emu)
        for u, v in zip(cpu, emu):
            assert u.dtype == v.dtype == dtype and torch.equal(u, v), name


def _compact_args(dtype, n_rays=300):
    """Marched samples with their densities, padding and valid count (test_native_ops._marched)."""
    from test_native_ops import _marched

    return _marched(n_rays=n_rays, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps,threshold", [(1e-4, 0.0), (0.3, 0.05)])
def test_compact_visible_samples(EMU, dtype, eps, threshold):
    """The pruning pass's count, scan, write and device-side padding (three launches of parallel_for.h's
    kernel over 300 rays: three blocks) equal the CPU op, below, at and above the kept total, with and
    without the valid count."""
    ri, ts, te, sig, n_valid, n_rays = _compact_args(dtype)
    for count in (n_valid, None):
        total = int(CPU.compact_visible_samples(ri, ts, te, sig, count, n_rays, eps, threshold, 0)[3])
        assert 0 < total < ri.numel()
        for capacity in (0, 1, total // 3, total, total + 100):
            cpu = CPU.compact_visible_samples(ri, ts, te, sig, count, n_rays, eps, threshold, capacity)
            emu = EMU.compact_visible_samples(ri, ts, te, sig, count, n_rays, eps, threshold, capacity)
            assert int(emu[3]) == total
            for u, v in zip(cpu, emu):
                assert u.dtype == v.dtype and torch.equal(u, v), capacity
    ran = _launches(EMU, [("compact_visible_samples", (ri, ts, te, sig, n_valid, n_rays, eps, threshold, 50))])
    assert len(ran) == 1 and ran[0].startswith("include/fastdream/parallel_for.h:") and "\tlaunches=3\t" in ran[0], ran


def _raster_calls(dtype, seed=0):
    """One call of each rasterization op on random triangles seen by two cameras, its inputs made by the
    CPU ops (so that the emulated launcher of one op is compared on identical inputs)."""
    from test_rasterize import _mesh

    pos, tri = _mesh(batch=2, n_verts=30, n_tris=40, dtype=dtype, seed=seed)
    H, W = 12, 16
    tri_id, bary, depth = CPU.rasterize_fwd(pos, tri, H, W)
    g = torch.Generator().manual_seed(seed + 1)
    attr = torch.rand(pos.shape[1], 3, generator=g, dtype=dtype)
    color = CPU.interpolate_fwd(attr, tri_id, bary, tri)
    g_img = torch.rand(color.shape, generator=g, dtype=dtype)
    g_bary, g_depth = torch.rand(bary.shape, generator=g, dtype=dtype), torch.rand(depth.shape, generator=g, dtype=dtype)
    adjacency = triangle_adjacency(tri)
    return [("rasterize_fwd", (pos, tri, H, W)), ("rasterize_bwd", (g_bary, g_depth, pos, tri, tri_id)),
            ("interpolate_fwd", (attr, tri_id, bary, tri)), ("interpolate_bwd", (g_img, attr, tri_id, bary, tri)),
            ("antialias_fwd", (color, tri_id, depth, pos, tri, adjacency)),
            ("antialias_bwd", (g_img, color, tri_id, depth, pos, tri, adjacency))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_rasterization(EMU, dtype, seed):
    """rasterize / interpolate / antialias, forward and backward: the CUDA launchers (emulated, through
    parallel_for.h's kernel and the 64-bit atomic z-buffer) equal the CPU ops bit for bit."""
    for name, args in _raster_calls(dtype, seed):
        want, got = getattr(CPU, name)(*args), getattr(EMU, name)(*args)
        want, got = (want,) if isinstance(want, torch.Tensor) else want, (got,) if isinstance(got, torch.Tensor) else got
        assert len(want) == len(got)
        for u, v in zip(want, got):
            assert u.dtype == v.dtype and torch.equal(u, v), name
    tri_id = CPU.rasterize_fwd(*_raster_calls(dtype, seed)[0][1])[0]
    assert (tri_id >= 0).any() and (tri_id < 0).any()  # the scene has both covered and empty pixels


def test_every_tensor_argument_must_be_on_the_ops_device(EMU):
    """Each tensor argument in turn moved to another device (meta) is rejected with a clear error by the
    CUDA launcher (emulated) and the CPU kernel (reached directly: the dispatcher would pick Meta)."""
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    for name, args in _one_op_call_per_op():
        getattr(EMU, name)(*args)  # the unchanged call runs
        if sum(isinstance(a, torch.Tensor) for a in args) < 2:
            continue  # one tensor argument: nothing to disagree with
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                continue
            moved = (*args[:i], a.to("meta"), *args[i + 1:])
            with pytest.raises(RuntimeError, match=f"{name}: all tensor arguments must be on one device"):
                getattr(EMU, name)(*moved)
            with pytest.raises(RuntimeError, match=f"{name}: all tensor arguments must be on one device"):
                getattr(CPU, name).default.redispatch(cpu_only, *moved)


def _packed(n_rays, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 40, (n_rays,), generator=g)
    counts[::7] = 0
    ri = torch.repeat_interleave(torch.arange(n_rays), counts)
    n = ri.numel()
    ts = torch.rand(n, generator=g, dtype=dtype) * 3
    te = ts + torch.rand(n, generator=g, dtype=dtype) * 0.1
    sig = torch.rand(n, generator=g, dtype=dtype) * 5
    return ts, te, sig, ray_offsets(ri, n_rays), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_render_weights(EMU, dtype):
    ts, te, sig, off, g = _packed(300, dtype)
    a, b = CPU.render_weights_fwd(ts, te, sig, off), EMU.render_weights_fwd(ts, te, sig, off)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    gw, gt, ga = (torch.randn(sig.shape, generator=g, dtype=dtype) for _ in range(3))
    for grads in [(gw, gt, ga), (gw, None, None), (None, gt, None), (None, None, ga)]:
        u = CPU.render_weights_bwd(*grads, ts, te, sig, off, a[1], a[2])
        v = EMU.render_weights_bwd(*grads, ts, te, sig, off, a[1], a[2])
        assert torch.equal(u, v)


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_gw", [False, True])
def test_composite(EMU, mode, dtype, with_gw):
    ts, te, sig, off, g = _packed(200, dtype, seed=mode)
    n, r = sig.numel(), off.numel() - 1
    alb = torch.rand(n, 3, generator=g, dtype=dtype)
    nrm = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=dtype), dim=-1)
    o, d = torch.randn(r, 3, generator=g, dtype=dtype), torch.randn(r, 3, generator=g, dtype=dtype)
    lights = torch.randn(r, 3, generator=g, dtype=dtype) * 3
    inten, amb = torch.rand(r, generator=g, dtype=dtype), torch.rand(r, generator=g, dtype=dtype)
    fa = (ts, te, off, sig, alb, nrm, o, d, lights, inten, amb, mode)
    a, b = CPU.composite_fwd(*fa), EMU.composite_fwd(*fa)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    gr = [torch.randn(t.shape, generator=g, dtype=dtype) for t in a[:4]]
    gw = torch.randn(n, generator=g, dtype=dtype) if with_gw else None
    ba = (*gr, gw, *fa[:-1], *a, mode, True)
    assert all(torch.equal(p, q) for p, q in zip(CPU.composite_bwd(*ba), EMU.composite_bwd(*ba)))


def test_empty_inputs(EMU):
    """Zero points / rays / samples: CUDA rejects a 0-block grid, so every launcher must skip its launch."""
    lay = hash_grid_layout(n_levels=2, log2_hashmap_size=6)
    args, x, p = layout_args(lay), torch.zeros(0, 3), torch.zeros(lay.n_params)
    aabb = torch.tensor([-1.0, -1, -1, 1, 1, 1])
    grid = torch.ones(4, 4, 4, dtype=torch.bool)
    for op in (CPU, EMU):
        assert op.hash_encode_fwd(x, p, *args).shape == (0, 2 * lay.n_features_per_level)
        gp, gx = op.hash_encode_bwd(torch.zeros(0, 4), x, p, *args, True, True)
        assert gp.shape == p.shape and gx.shape == (0, 3) and not gp.any()
        ggy, gp, gx = op.hash_encode_bwd_bwd(torch.zeros(0, 3), torch.zeros(0, 4), x, p, *args, True, True)
        assert ggy.shape == (0, 4) and gx.shape == (0, 3)
        out = op.march_rays(torch.zeros(0, 3), torch.zeros(0, 3), aabb, grid, 0.0, 1e10, 0.1, 0.0, 1e10)
        assert all(t.numel() == 0 for t in out)
        out = op.march_rays(torch.full((5, 3), 5.0), torch.tensor([[1.0, 0, 0]] * 5), aabb, grid, 0.0, 1e10, 0.1, 0.0, 1e10)
        assert all(t.numel() == 0 for t in out)  # rays miss: the count pass runs, the fill pass must not
        ri, ts, te, n = op.march_rays_fixed(torch.zeros(0, 3), torch.zeros(0, 3), aabb, grid, 0.0, 1e10, 0.1, 0.0, 1e10, 0)
        assert ri.numel() == 0 and int(n) == 0
        ri, ts, te, n = op.march_rays_fixed(torch.full((5, 3), 5.0), torch.tensor([[1.0, 0, 0]] * 5), aabb, grid,
                                            0.0, 1e10, 0.1, 0.0, 1e10, 3)
        assert int(n) == 0 and ri.tolist() == [4, 4, 4] and not te.any()  # all padding
        upd, occ = op.occupancy_update(torch.rand(8), torch.zeros(0, dtype=torch.long), torch.zeros(0), 0.5, 0.1)
        assert upd.shape == (8,)
        e, off = torch.zeros(0), torch.zeros(1, dtype=torch.long)
        assert all(t.numel() == 0 for t in op.render_weights_fwd(e, e, e, off))
        ri, ts, te, n = op.compact_visible_samples(off[:0], e, e, e, torch.tensor(0), 4, 1e-4, 0.0, 3)
        assert int(n) == 0 and ri.tolist() == [3, 3, 3] and not te.any()  # no samples: only the padding pass
        ri, ts, te, n = op.compact_visible_samples(off[:0], e, e, e, None, 0, 1e-4, 0.0, 0)
        assert int(n) == 0 and ri.numel() == 0  # no rays, no slots: nothing launched


def _launches(EMU, calls):
    EMU.launch_stats_reset()
    for name, args in calls:
        getattr(EMU, name)(*args)
    return [line for line in EMU.launch_stats().splitlines() if line.strip()]


def test_every_launch_site_runs(EMU):
    """One call of each op runs every kernel launch written in csrc/cuda/*.cu and in the csrc headers."""
    from cuda_emulation.build import launch_sites

    sites = launch_sites()
    assert sites.get("include/fastdream/parallel_for.h") == 1, sites
    ran = _launches(EMU, _one_op_call_per_op())
    assert len(ran) == sum(sites.values()), "\n".join(ran)
    assert {line.split(":")[0] for line in ran} == set(sites), "\n".join(ran)


SHARED = ["render_weights_fwd", "render_weights_bwd", "composite_fwd", "composite_bwd"]


@pytest.mark.parametrize("name", SHARED)
def test_shared_launchers_launch_the_parallel_for_kernel(EMU, name):
    """The launchers written once in csrc/launchers/volume_rendering.h are emulated through their CUDA
    branch: one launch of parallel_for.h's kernel, one emulated thread per ray rounded up to whole blocks
    (the CPU branch, at::parallel_for, would launch nothing)."""
    call = dict(_one_op_call_per_op())[name]
    ran = _launches(EMU, [(name, call)])
    assert len(ran) == 1 and ran[0].startswith("include/fastdream/parallel_for.h:"), ran
    assert "parallel_for_kernel" in ran[0] and "\tlaunches=1\tthreads=128" in ran[0], ran


# --- the harness itself: it must catch a planted launcher bug ----------------------------------------
PLANTED = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from cuda_emulation.build import build
    import test_cuda_emulation as t

    BUGS = {{"marching.cu": [("ends[r] - counts[r]", "ends[r] - counts[r] + 1"),        # fill offset off by one
                            ("c10::cuda::CUDAGuard guard(occupancy.device());", "")],  # launch without a guard
            # the CUDA branch's kernel forgets the block index: rays past the first block are never walked
            "parallel_for.h": [("static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x",
                                "static_cast<int64_t>(threadIdx.x)")]}}
    planted = []

    def plant(name, text):
        for good, bad in BUGS.get(name, []):
            assert good in text, "a planted bug no longer applies: " + good
            text = text.replace(good, bad)
            planted.append(good)
        return text

    build({build!r}, namespace="fastdream_cudaemu_planted", only=["marching.cu", "compositing.cu"], patch=plant)
    assert len(planted) == 3, "a planted bug no longer applies"
    emu = torch.ops.fastdream_cudaemu_planted
    try:
        emu.occupancy_update(torch.zeros(8), torch.tensor([1]), torch.ones(1), 0.9, 0.5)
        print("GUARD NOT CAUGHT")
    except RuntimeError as e:
        print("GUARD CAUGHT" if "without a CUDAGuard" in str(e) else "GUARD OTHER ERROR " + str(e))
    ts, te, sig, off, _ = t._packed(300, torch.float32)
    same = all(torch.equal(u, v) for u, v in zip(torch.ops.fastdream.render_weights_fwd(ts, te, sig, off),
                                                 emu.render_weights_fwd(ts, te, sig, off)))
    print("PARALLEL_FOR SAME" if same else "PARALLEL_FOR DIFFERENT", flush=True)
    args = t._march_args(t.MARCH_CASES[0], (16, 16, 16), torch.float32)
    same = all(torch.equal(u, v) for u, v in zip(torch.ops.fastdream.march_rays(*args), emu.march_rays(*args)))
    print("FILL SAME" if same else "FILL DIFFERENT")
""")


def test_harness_catches_planted_launcher_bugs(EMU, tmp_path):
    """marching.cu with the fill pass's write offset off by one and the occupancy launcher's device guard
    removed, and parallel_for.h's CUDA kernel indexing by thread alone (patched copies, built in a
    subprocess since the first bug writes out of bounds): the march must disagree with the CPU op (or the
    process stop), the launch without a guard must raise, and the shared render-weights launcher must
    disagree with the CPU op (it would not if the emulation compiled parallel_for.h's CPU branch)."""
    script = tmp_path / "planted.py"
    script.write_text(PLANTED.format(tests=str(ROOT / "tests"), build=str(BUILD / "planted")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert "no longer applies" not in run.stderr and "Error building extension" not in run.stderr, run.stderr[-3000:]
    assert "GUARD CAUGHT" in run.stdout, (run.stdout, run.stderr[-3000:])
    assert "PARALLEL_FOR DIFFERENT" in run.stdout, (run.stdout, run.stderr[-3000:])
    assert "FILL DIFFERENT" in run.stdout or (run.returncode != 0 and "FILL SAME" not in run.stdout), \
        (run.stdout, run.stderr[-3000:])
