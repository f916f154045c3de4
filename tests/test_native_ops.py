"""Native kernels (fastdream._C, torch.ops.fastdream.*) against the PyTorch reference ops.

Every op is run through both implementations ("reference" and "native"); the native one is skipped
only when the extension is not built (CI builds it and sets FASTDREAM_REQUIRE_NATIVE=1, which turns a
missing extension into a failure). Tolerances: float32 forward outputs within 1e-5 (hash encoding and
marching are exact: same float rounding as the reference), float32 gradients within 1e-4 relative;
float64 gradients via gradcheck. CUDA variants are marked `cuda` and skipped without a GPU.
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from dispatched import DispatchedOps
from fastdream import _backend
from fastdream.ops import hash_grid_layout
from fastdream.ops import use_backend as ops_use_backend
from fastdream.ops.compositing import composite_reference
from fastdream.ops.hash_encoding import hash_encode_reference
from fastdream.ops.marching import march_rays_fixed_reference, march_rays_reference, occupancy_update_reference
from fastdream.ops.volume_rendering import render_weights_reference


def _native_module():
    # the torch backend only changes routing; these tests still exercise the extension
    return _backend.extension()


def _native():
    if _native_module() is None:
        pytest.skip(f"native extension not built ({_backend.extension_error()})")
    from fastdream.ops import _native as nat
    return nat


REFERENCE = SimpleNamespace(name="reference", hash_encode=hash_encode_reference, render_weights=render_weights_reference,
                            march_rays=march_rays_reference, composite=composite_reference)


def _impl(name):
    if name == "reference":
        return REFERENCE
    nat = _native()
    return SimpleNamespace(name="native", hash_encode=nat.hash_encode, render_weights=nat.render_weights,
                           march_rays=nat.march_rays, composite=nat.composite)


_HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA GPU")])]


def _native_on(device):
    nat = _native()
    if device not in _native_module().compiled_devices():
        pytest.skip(f"extension built without {device} kernels")
    return nat


@pytest.fixture(params=["reference", "native"])
def impl(request):
    return _impl(request.param)


# ----------------------------------------------------------------------------- build / routing
def test_extension_is_built_when_required():
    if os.environ.get("FASTDREAM_REQUIRE_NATIVE", "") != "1":
        pytest.skip("set FASTDREAM_REQUIRE_NATIVE=1 to require the native extension")
    module = _backend.extension()
    assert module is not None, f"native extension failed to load: {_backend.extension_error()}"
    assert "cpu" in module.compiled_devices()
    assert hasattr(torch.ops.fastdream, "hash_encode_fwd")
    if torch.cuda.is_available() and torch.version.cuda:
        assert "cuda" in module.compiled_devices(), "a CUDA machine with a CUDA torch should build the CUDA kernels"


def test_ops_route_to_native(monkeypatch):
    nat = _native()
    from fastdream import ops
    calls = []
    real = nat.hash_encode
    monkeypatch.setattr(nat, "hash_encode", lambda *a: calls.append(1) or real(*a))
    layout_kw = dict(n_levels=2, log2_hashmap_size=6, base_resolution=4)
    params = torch.zeros(ops.hash_grid_n_params(**layout_kw))
    with ops.use_backend("auto"):
        ops.hash_encode(torch.rand(5, 3), params, **layout_kw)
        assert calls, "ops.hash_encode did not use the native kernel"
        with ops.use_backend("torch"):
            ops.hash_encode(torch.rand(5, 3), params, **layout_kw)
            assert len(calls) == 1, "the torch backend must route to the reference"
            assert ops.backend_name("cpu") == "torch"
        assert ops.backend_name("cpu") == "native", "leaving use_backend restores the previous choice"


def test_module_reports_devices_and_archs():
    _native()
    module = _native_module()
    assert set(module.compiled_devices()) <= {"cpu", "cuda"}
    archs = module.cuda_archs()
    assert isinstance(archs, list)
    assert ("cuda" in module.compiled_devices()) == bool(archs)


# ----------------------------------------------------------------------------- hash encoding
HASH_CONFIGS = [
    dict(n_levels=3, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4),                # dense + hashed
    dict(n_levels=4, n_features_per_level=1, log2_hashmap_size=10, base_resolution=3, per_level_scale=1.7),
    dict(n_levels=2, n_features_per_level=4, log2_hashmap_size=6, base_resolution=5, per_level_scale=2.3),
    dict(n_levels=2, n_features_per_level=8, log2_hashmap_size=7, base_resolution=2),
    dict(n_levels=16, log2_hashmap_size=14),  # default scales (16 -> 2048), hashed fine levels
]


def _hash_points(layout, n=257, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g, dtype=torch.float64)
    x[0] = 0.0
    x[1] = 1.0
    x[2] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    # points whose grid position x * scale + 0.5 is an integer (cell boundaries) on some level
    k = 0
    for scale in layout.scales[:4]:
        for i in range(1, 4):
            v = (i - 0.5) / scale
            if 0 <= v <= 1 and 3 + k < n:
                x[3 + k] = v
                k += 1
    return x.to(dtype)


HASH_CASES = [(c, dt) for c in HASH_CONFIGS[:-1] for dt in (torch.float32, torch.float16)] + [(HASH_CONFIGS[-1], torch.float32)]


@pytest.mark.parametrize("cfg,params_dtype", HASH_CASES,
                         ids=lambda c: ("-".join(f"{k[:4]}{v}" for k, v in c.items()) or "default") if isinstance(c, dict) else str(c)[6:])
def test_hash_encode_native_matches_reference(cfg, params_dtype):
    nat = _native()
    layout = hash_grid_layout(**cfg)
    x = _hash_points(layout)
    params = (torch.randn(layout.n_params, generator=torch.Generator().manual_seed(1)) * 0.1).to(params_dtype)
    outs = []
    for fn in (hash_encode_reference, nat.hash_encode):
        xx = x.clone().requires_grad_()
        pp = params.clone().requires_grad_()
        y = fn(xx, pp, layout)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        gx, gp = torch.autograd.grad(y, (xx, pp), g)
        outs.append((y, gx, gp))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    assert y1.dtype == y0.dtype and y1.shape == y0.shape
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    assert gp1.dtype == params_dtype
    tol = 1e-3 if params_dtype == torch.float16 else 1e-5
    torch.testing.assert_close(gp1.float(), gp0.float(), rtol=tol, atol=tol)
    # d/dx scales with the finest resolution (up to ~2048): compare relative to that
    scale = max(layout.scales)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("impl_name", ["reference", "native"])
def test_hash_encode_gradcheck_and_double_backward_float64(impl_name):
    impl = _impl(impl_name)
    layout = hash_grid_layout(n_levels=2, n_features_per_level=2, log2_hashmap_size=4, base_resolution=2)
    g = torch.Generator().manual_seed(3)
    # keep points away from cell boundaries, where finite differences straddle a kink
    x = (torch.rand(6, 3, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    p = torch.randn(layout.n_params, generator=g, dtype=torch.float64).requires_grad_()
    fn = lambda xx, pp: impl.hash_encode(xx, pp, layout)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, p))
    assert torch.autograd.gradgradcheck(fn, (x, p), fast_mode=True)


def test_hash_encode_normals_loss_gradients_match_reference():
    """Analytic normals: grad of a loss on d(density)/dx w.r.t. params (tcnn's bwd_bwd_input path)."""
    nat = _native()
    layout = hash_grid_layout(n_levels=4, log2_hashmap_size=9, base_resolution=4)
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(64, 3, generator=g)
    p0 = torch.randn(layout.n_params, generator=g) * 0.1
    head = torch.randn(layout.n_params and len(layout.scales) * 2, generator=g)
    grads = []
    for fn in (hash_encode_reference, nat.hash_encode):
        x = x0.clone().requires_grad_()
        p = p0.clone().requires_grad_()
        density = (fn(x, p, layout) @ head).exp()
        (normals,) = torch.autograd.grad(density.sum(), x, create_graph=True)
        loss = (normals ** 2).sum() + density.sum()
        grads.append(torch.autograd.grad(loss, (p,))[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4 * grads[0].abs().max().item())


@pytest.mark.parametrize("impl_name", ["reference", "native"])
def test_hash_encode_empty_batch(impl_name):
    impl = _impl(impl_name)
    layout = hash_grid_layout(n_levels=2, log2_hashmap_size=6, base_resolution=4)
    x = torch.zeros(0, 3, requires_grad=True)
    p = torch.randn(layout.n_params, requires_grad=True)
    y = impl.hash_encode(x, p, layout)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.count_nonzero(p.grad) == 0


def test_hash_encode_float64_x_with_float32_params():
    nat = _native()
    layout = hash_grid_layout(n_levels=2, log2_hashmap_size=6, base_resolution=4)
    x = torch.rand(9, 3, dtype=torch.float64)
    p = torch.randn(layout.n_params)
    y0, y1 = hash_encode_reference(x, p, layout), nat.hash_encode(x, p, layout)
    assert y0.dtype == y1.dtype == torch.float32
    torch.testing.assert_close(y1, y0)


# ----------------------------------------------------------------------------- marching
def _march_rays(n=96, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    origins = (torch.rand(n, 3, generator=g) * 2 - 1) * 2.5
    directions = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    # aim most rays roughly at the box
    directions[: n // 2] = torch.nn.functional.normalize(-origins[: n // 2] + 0.3 * torch.randn(n // 2, 3, generator=g), dim=-1)
    axes = torch.eye(3)
    origins[0], directions[0] = torch.tensor([-2.0, 0.1, 0.2]), axes[0]          # parallel to x
    origins[1], directions[1] = torch.tensor([0.3, 2.0, -0.4]), -axes[1]         # parallel to y
    origins[2], directions[2] = torch.tensor([0.0, 0.0, 0.0]), axes[2]           # starts inside, parallel to z
    origins[3], directions[3] = torch.tensor([0.0, 3.0, 0.0]), axes[0]           # parallel, misses the box
    origins[4], directions[4] = torch.tensor([5.0, 5.0, 5.0]), axes[0]           # misses
    origins[5], directions[5] = torch.tensor([-1.0, -1.0, -1.0]), torch.nn.functional.normalize(torch.ones(3), dim=0)  # corner
    origins[6], directions[6] = torch.tensor([-2.0, 1.0, 0.0]), axes[0]          # grazes the y=1 face
    return origins.to(dtype), directions.to(dtype)


MARCH_CASES = [
    dict(step_size=0.05),
    dict(step_size=0.02, cone_angle=0.01),
    dict(step_size=0.01, cone_angle=0.05, max_step_size=0.08),
    dict(step_size=0.03, near=1.5, far=3.0),
    dict(step_size=0.05, near=4.0, far=3.0),  # empty range
]


@pytest.mark.parametrize("case", MARCH_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("grid_shape", [(8, 8, 8), (5, 7, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_march_native_matches_reference_exactly(case, grid_shape, dtype):
    nat = _native()
    origins, directions = _march_rays(dtype=dtype)
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    binary = torch.rand(grid_shape, generator=torch.Generator().manual_seed(5)) > 0.6
    kw = dict(near=0.0, far=1e10, cone_angle=0.0, max_step_size=1e10)
    kw.update(case)
    ref = march_rays_reference(origins, directions, aabb, binary, **kw)
    out = nat.march_rays(origins, directions, aabb, binary, **kw)
    for a, b in zip(ref, out):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl_name", ["reference", "native"])
def test_march_edge_cases(impl_name):
    impl = _impl(impl_name)
    aabb = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 1.0])
    full = torch.ones(4, 4, 4, dtype=torch.bool)
    empty = torch.zeros(4, 4, 4, dtype=torch.bool)
    o = torch.tensor([[-1.0, 0.5, 0.5], [0.5, 0.5, 5.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # second ray misses
    ri, ts, te = impl.march_rays(o, d, aabb, full, 0.0, 1e10, 0.25)
    assert ri.tolist() == [0, 0, 0, 0] and ts[0].item() == 1.0 and te[-1].item() == 2.0
    assert bool((te > ts).all())
    for grid in (empty, full):
        ri, ts, te = impl.march_rays(torch.zeros(0, 3), torch.zeros(0, 3), aabb, grid, 0.0, 1e10, 0.1)
        assert ri.shape == ts.shape == te.shape == (0,) and ri.dtype == torch.int64
    ri, ts, te = impl.march_rays(o, d, aabb, empty, 0.0, 1e10, 0.1)
    assert ri.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity_of_total", [0.0, 0.5, 1.0, 1.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_march_fixed_capacity_matches_reference(capacity_of_total, dtype, device):
    """The fixed-capacity march: the reference's packed samples in the first slots (cut at the capacity when
    they overflow it), zero-length padding of the last ray after them, and the true total on the device."""
    nat = _native_on(device)
    origins, directions = _march_rays(dtype=dtype)
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    binary = torch.rand((8, 8, 8), generator=torch.Generator().manual_seed(5)) > 0.6
    kw = dict(near=0.0, far=1e10, step_size=0.05, cone_angle=0.0, max_step_size=1e10)
    full = march_rays_reference(origins, directions, aabb, binary, **kw)
    total = full[0].numel()
    capacity = int(total * capacity_of_total)
    ref = march_rays_fixed_reference(origins, directions, aabb, binary, **kw, capacity=capacity)
    moved = [t.to(device) for t in (origins, directions, aabb, binary)]
    out = [t.cpu() for t in nat.march_rays_fixed(*moved, **kw, capacity=capacity)]
    for a, b in zip(ref, out):
        assert a.dtype == b.dtype and torch.equal(a, b)
    ri, ts, te, n = out
    assert ri.shape == ts.shape == te.shape == (capacity,) and n.shape == () and int(n) == total > 100
    kept = min(total, capacity)
    assert torch.equal(ri[:kept], full[0][:kept]) and torch.equal(ts[:kept], full[1][:kept])
    assert bool((ri[kept:] == origins.shape[0] - 1).all()) and not ts[kept:].any() and not te[kept:].any()


def test_march_fixed_padding_composites_to_nothing():
    """Padding slots change no image and get no gradient: composite over the fixed buffer equals composite
    over the exact samples, and the padded sigmas/albedo gradients are exactly zero."""
    nat = _native()
    origins, directions = _march_rays(n=64, seed=3)
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    binary = torch.ones(8, 8, 8, dtype=torch.bool)
    kw = dict(near=0.0, far=1e10, step_size=0.05, cone_angle=0.0, max_step_size=1e10)
    exact = nat.march_rays(origins, directions, aabb, binary, **kw)
    n = exact[0].numel()
    ri, ts, te, _ = nat.march_rays_fixed(origins, directions, aabb, binary, **kw, capacity=n + 500)
    g = torch.Generator().manual_seed(0)
    sig, alb = torch.rand(n + 500, generator=g) * 5, torch.rand(n + 500, 3, generator=g)
    nrm = torch.nn.functional.normalize(torch.randn(n + 500, 3, generator=g), dim=-1)
    per_ray = dict(n_rays=64, origins=origins, directions=directions, light_positions=origins * 2,
                   light_intensity=torch.ones(64), ambient=torch.full((64,), 0.2), mode="lambertian")
    s, a, m = sig.clone().requires_grad_(), alb.clone().requires_grad_(), nrm.clone().requires_grad_()
    fixed = nat.composite(ts, te, ri, sigmas=s, albedo=a, normals=m, **per_ray)
    ref = nat.composite(exact[1], exact[2], exact[0], sigmas=sig[:n], albedo=alb[:n], normals=nrm[:n], **per_ray)
    for u, v in zip(fixed[:4], ref[:4]):
        assert torch.allclose(u, v, atol=1e-6)
    sum(o.sum() for o in fixed[:4]).backward()
    assert not s.grad[n:].any() and not a.grad[n:].any() and not m.grad[n:].any() and s.grad[:n].abs().sum() > 0


def test_march_large_random_scene():
    nat = _native()
    origins, directions = _march_rays(n=2000, seed=7)
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    binary = torch.rand(32, 32, 32, generator=torch.Generator().manual_seed(8)) > 0.8
    ref = march_rays_reference(origins, directions, aabb, binary, 0.1, 1e10, 2 * 3 ** 0.5 / 256, 1 / 256)
    out = nat.march_rays(origins, directions, aabb, binary, 0.1, 1e10, 2 * 3 ** 0.5 / 256, 1 / 256)
    assert ref[0].numel() > 1000
    for a, b in zip(ref, out):
        assert torch.equal(a, b)


def _skip_stress_rays(aabb, res, dtype, seed=11):
    """Rays that make empty-space skipping hard to get exactly right: through cell and block corners,
    lying in cell faces, grazing block edges, starting far away or inside the grid."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = aabb[:3].double(), aabb[3:].double()
    cell = (hi - lo) / torch.tensor(res, dtype=torch.float64)
    lattice = lambda k: lo + cell * k  # noqa: E731  (k in cell units, per axis)
    rays = []
    for _ in range(48):  # from outside, through an exact block corner (multiples of 8 cells)
        corner = lattice(torch.randint(0, 3, (3,), generator=g).double() * 8)
        start = corner + torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0) * 3.0
        rays.append((start, corner - start))
    for _ in range(48):  # in a cell face plane (one axis fixed on a face, zero direction along it)
        a = int(torch.randint(0, 3, (1,), generator=g))
        o = lo + (hi - lo) * torch.rand(3, generator=g, dtype=torch.float64)
        o[a] = lattice(torch.randint(0, res[a] + 1, (3,), generator=g).double())[a]
        d = torch.randn(3, generator=g, dtype=torch.float64)
        d[a] = 0.0
        o = o - 2.5 * torch.nn.functional.normalize(d, dim=0)
        rays.append((o, d))
    for _ in range(48):  # along a cell edge: two axes on faces, moving along the third
        a = int(torch.randint(0, 3, (1,), generator=g))
        o = lattice(torch.randint(0, 9, (3,), generator=g).double())
        d = torch.zeros(3, dtype=torch.float64)
        d[a] = 1.0 if bool(torch.rand(1, generator=g) < 0.5) else -1.0
        o[a] = lo[a] - 0.5 if d[a] > 0 else hi[a] + 0.5
        rays.append((o, d))
    for _ in range(32):  # from far away, and from inside
        far = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0) * 1e3
        rays.append((far, -far + torch.randn(3, generator=g, dtype=torch.float64) * 0.3))
        inside = lo + (hi - lo) * torch.rand(3, generator=g, dtype=torch.float64)
        rays.append((inside, torch.randn(3, generator=g, dtype=torch.float64)))
    o = torch.stack([r[0] for r in rays]).to(dtype)
    d = torch.nn.functional.normalize(torch.stack([r[1] for r in rays]), dim=-1).to(dtype)
    return o, d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cone_angle,step_size", [(0.0, 0.7 / 64), (0.0, 1 / 30), (0.02, 0.7 / 64)])
def test_march_skipping_empty_space_is_exact(dtype, cone_angle, step_size, device):
    """The native marcher decides whole cells and empty 8^3 blocks per lookup; on a sparse grid whose
    size is not a multiple of the block, with rays through corners, along faces and edges, from far
    away and from inside, it must still emit exactly the reference's samples. With step 1/30 (2/3 of a
    0.05 cell) the axis-aligned rays put sample midpoints on cell faces, up to rounding. The reference
    runs on the CPU in both cases."""
    nat = _native_on(device)
    aabb = torch.tensor([-1.0, -0.6, -0.8, 1.0, 0.6, 0.9])
    res = (40, 24, 17)
    g = torch.Generator().manual_seed(3)
    # Half the 8^3 blocks empty (skipped whole), the rest a 50% random pattern, so most cell faces
    # separate an occupied cell from an empty one and any misplaced midpoint changes the output.
    blocks = torch.rand(5, 3, 3, generator=g) > 0.5
    block_of_cell = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1).repeat_interleave(8, 2)[:40, :24, :17]
    binary = block_of_cell & (torch.rand(res, generator=g) > 0.5)
    origins, directions = _skip_stress_rays(aabb, res, dtype)
    kw = dict(near=0.0, far=1e4, step_size=step_size, cone_angle=cone_angle, max_step_size=0.05)
    ref = march_rays_reference(origins, directions, aabb, binary, **kw)
    out = nat.march_rays(origins.to(device), directions.to(device), aabb.to(device), binary.to(device), **kw)
    assert ref[0].numel() > 150 and ref[0].unique().numel() > 40
    for a, b in zip(ref, out):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_occupancy_update_matches_reference(device, dtype):
    """Decay, max with the estimates of visited cells (some drawn several times, some estimates NaN or
    inf, which are ignored), threshold capped at the mean: the same values and bits as the reference."""
    nat = _native_on(device)
    g = torch.Generator().manual_seed(9)
    n = 6 * 7 * 5
    occupancy = (torch.rand(n, generator=g) * 0.02).to(dtype)
    indices = torch.cat([torch.randint(0, n, (150,), generator=g), torch.tensor([3, 3, 3, 17, 17])])
    estimates = (torch.rand(155, generator=g) * 0.03).to(dtype)
    estimates[[4, 40]] = float("nan")
    estimates[[7, -1]] = float("inf")   # -1: cell 17, also drawn with a finite estimate
    estimates[-3] = 0.5                  # the finite max for cell 3
    for threshold in (0.01, 1.0):       # 1.0: the mean caps the threshold
        ref = occupancy_update_reference(occupancy, indices, estimates, 0.95, threshold)
        out = nat.occupancy_update(occupancy.to(device), indices.to(device), estimates.to(device), 0.95, threshold)
        assert out[0].dtype == dtype and out[1].dtype == torch.bool
        torch.testing.assert_close(out[0].cpu(), ref[0], rtol=0, atol=0)
        assert torch.equal(out[1].cpu(), ref[1])
        assert 0.2 < ref[1].float().mean() < 0.9
    # and the reference against the rule spelled out cell by cell
    expected = (occupancy * 0.95).tolist()
    for i, e in zip(indices.tolist(), estimates.tolist()):
        if math.isfinite(e):
            expected[i] = max(expected[i], e)
    assert ref[0].tolist() == expected and expected[3] == 0.5
    with pytest.raises(RuntimeError, match="out of range"):
        nat.occupancy_update(occupancy, torch.tensor([n]), torch.ones(1, dtype=dtype), 0.95, 0.01)


@pytest.mark.parametrize("device", DEVICES)
def test_occupancy_update_keeps_a_nan_cell_like_the_reference(device):
    _native_on(device)
    occupancy = torch.tensor([float("nan"), 0.1, 0.2], device=device)
    indices, estimates = torch.tensor([0, 0, 2], device=device), torch.tensor([0.9, 0.8, 0.7], device=device)
    out = torch.ops.fastdream.occupancy_update(occupancy, indices, estimates, 1.0, 0.5)[0]
    ref = occupancy_update_reference(occupancy.cpu(), indices.cpu(), estimates.cpu(), 1.0, 0.5)[0]
    assert torch.isnan(out[0]) and torch.equal(out[1:].cpu(), ref[1:]) and torch.isnan(ref[0])


def test_ops_reject_tensors_on_two_devices():
    """The CPU kernel, reached with one argument on another device (meta), names the op and the devices."""
    _native()
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    occupancy, indices, estimates = torch.zeros(4), torch.tensor([1]), torch.ones(1)
    with pytest.raises(RuntimeError, match="occupancy_update: all tensor arguments must be on one device, got cpu and meta"):
        torch.ops.fastdream.occupancy_update.default.redispatch(cpu_only, occupancy, indices, estimates.to("meta"), 0.9, 0.5)


# ----------------------------------------------------------------------------- pruning pass
def _marched(n_rays=60, seed=0, dtype=torch.float32, n_pad=9):
    """Packed samples as the marcher writes them (grouped by ray, increasing t): rays with no samples, rays
    whose first sample is opaque, transparent samples (sigma 0); then n_pad slots of march_rays_fixed's
    padding (zero-length intervals of the last ray) and the valid count."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 14, (n_rays,), generator=g)
    counts[::6] = 0
    counts[-1] = max(int(counts[-1]), 2)
    ray_indices = torch.repeat_interleave(torch.arange(n_rays), counts)
    n = ray_indices.numel()
    t_starts = (torch.arange(n, dtype=torch.float64) * 0.05 + torch.rand(n, generator=g, dtype=torch.float64) * 0.01)
    t_ends = t_starts + 0.04
    sigmas = torch.rand(n, generator=g, dtype=torch.float64) * 60
    sigmas[torch.rand(n, generator=g) < 0.25] = 0.0
    first = torch.cumsum(counts, 0) - counts
    sigmas[first[(counts > 0) & (torch.arange(n_rays) % 4 == 1)]] = 1e4  # terminates after its first sample
    sigmas[ray_indices == n_rays - 1] = 0.0  # the padding's ray stays clear: only n_samples drops the padding
    pad = lambda v, fill: torch.cat([v, v.new_full((n_pad,), fill)])  # noqa: E731
    return (pad(ray_indices, n_rays - 1), pad(t_starts, 0.0).to(dtype), pad(t_ends, 0.0).to(dtype),
            pad(sigmas, 50.0).to(dtype), torch.tensor(n), n_rays)


def _visible_by_mask(ray_indices, t_starts, t_ends, sigmas, n_valid, n_rays, eps, threshold):
    """The pruning pass as a boolean mask over the whole render_weights pass (the renderer's former logic)."""
    _, trans, alphas = render_weights_reference(t_starts, t_ends, sigmas, ray_indices, n_rays)
    keep = (trans >= eps) & (alphas >= threshold) & (torch.arange(ray_indices.numel()) < n_valid)
    return ray_indices[keep], t_starts[keep], t_ends[keep]


def _compact_impl(name, device="cpu"):
    if name == "reference":
        from fastdream.ops.pruning import compact_visible_samples_reference
        return compact_visible_samples_reference
    return _native_on(device).compact_visible_samples


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl_name", ["reference", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps,threshold", [(1e-4, 0.0), (1e-4, 0.05), (0.3, 0.0), (0.0, 0.2), (2.0, 0.0)])
def test_compact_visible_samples_matches_the_mask(impl_name, dtype, eps, threshold, device):
    """Native and twin against the boolean mask of a full render_weights pass: the same samples in the same
    order, then padding, at capacities below, at and above the kept total (outputs cut consistently, the
    true total returned), with the valid count cutting the march buffer's padding or a ray in the middle."""
    compact = _compact_impl(impl_name, device)
    ri, ts, te, sig, n_valid, n_rays = _marched(dtype=dtype)
    for n_samples in (n_valid, n_valid - 5):
        want = _visible_by_mask(ri, ts, te, sig, int(n_samples), n_rays, eps, threshold)
        k = want[0].numel()
        if eps == 1e-4 and n_samples is n_valid:  # the scene exercises what it means to
            every = _visible_by_mask(ri, ts, te, sig, int(n_samples), n_rays, 0.0, threshold)[0].numel()
            assert 0 < k < every  # early termination drops samples
            if threshold == 0.0:  # without the valid count the padding would be kept
                assert k + 9 == _visible_by_mask(ri, ts, te, sig, ri.numel(), n_rays, eps, 0.0)[0].numel()
        for capacity in sorted({0, k // 2, k, k + 7, ri.numel()}):
            args = [t.to(device) for t in (ri, ts, te, sig, n_samples)]
            out_ri, out_ts, out_te, n_kept = (t.cpu() for t in compact(*args, n_rays, eps, threshold, capacity))
            assert n_kept.shape == () and n_kept.dtype == torch.int64 and int(n_kept) == k, capacity
            assert out_ri.shape == out_ts.shape == out_te.shape == (capacity,) and out_ts.dtype == dtype
            m = min(k, capacity)
            assert torch.equal(out_ri[:m], want[0][:m]) and torch.equal(out_ts[:m], want[1][:m])
            assert torch.equal(out_te[:m], want[2][:m]), capacity
            assert (out_ri[m:] == n_rays - 1).all() and not out_ts[m:].any() and not out_te[m:].any()


@pytest.mark.parametrize("impl_name", ["reference", "native"])
def test_compact_visible_samples_without_a_count_and_when_empty(impl_name):
    """n_samples None: every slot is valid (the exactly sized path); no samples: all padding; no rays."""
    compact = _compact_impl(impl_name)
    ri, ts, te, sig, n_valid, n_rays = _marched(n_pad=0)
    a, b = compact(ri, ts, te, sig, None, n_rays, 1e-4, 0.0, ri.numel()), compact(ri, ts, te, sig, n_valid, n_rays,
                                                                                    1e-4, 0.0, ri.numel())
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    e, ei = torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    out_ri, out_ts, out_te, n_kept = compact(ei, e, e, e, torch.tensor(0), 5, 1e-4, 0.0, 3)
    assert out_ri.tolist() == [4, 4, 4] and not out_te.any() and int(n_kept) == 0
    out_ri, _, _, n_kept = compact(ei, e, e, e, None, 0, 1e-4, 0.0, 2)
    assert out_ri.tolist() == [0, 0] and int(n_kept) == 0


@pytest.mark.parametrize("impl_name", ["reference", "native"])
def test_compact_visible_samples_rejects_bad_input(impl_name):
    from fastdream.errors import FastDreamError

    compact = _compact_impl(impl_name)
    ri, ts, te, sig, n_valid, n_rays = _marched()
    with pytest.raises(FastDreamError, match="n_samples must be None or a one-element int64 tensor"):
        compact(ri, ts, te, sig, n_valid.float(), n_rays, 1e-4, 0.0, 8)
    with pytest.raises(FastDreamError, match="capacity must be >= 0"):
        compact(ri, ts, te, sig, n_valid, n_rays, 1e-4, 0.0, -1)
    with pytest.raises(FastDreamError, match="sigmas must have shape"):
        compact(ri, ts, te, sig[:-1], n_valid, n_rays, 1e-4, 0.0, 8)


def test_compact_visible_samples_routes_by_backend():
    """ops.compact_visible_samples runs the native op under the native backend and the twin under torch."""
    _native()
    from fastdream import ops

    ri, ts, te, sig, n_valid, n_rays = _marched()
    kw = dict(n_samples=n_valid, n_rays=n_rays, early_stop_eps=1e-4, alpha_threshold=0.0, capacity=100)
    with ops_use_backend("native"):
        a = ops.compact_visible_samples(ri, ts, te, sig, **kw)
    with ops_use_backend("torch"):
        b = ops.compact_visible_samples(ri, ts, te, sig, **kw)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# ----------------------------------------------------------------------------- volume rendering
def _packed(n_rays=7, seed=0, dtype=torch.float64, max_samples=6):
    """Packed samples with rays of 0..max_samples samples, zero-length intervals and large densities."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_samples + 1, (n_rays,), generator=g)
    counts[0] = 0
    counts[-1] = max(int(counts[-1]), 3)
    ray_indices = torch.repeat_interleave(torch.arange(n_rays), counts)
    n = ray_indices.numel()
    dt = torch.rand(n, generator=g, dtype=dtype) * 0.3
    dt[::5] = 0.0  # zero-length ranges
    t_starts = torch.rand(n, generator=g, dtype=dtype) + torch.arange(n, dtype=dtype)
    t_ends = t_starts + dt
    sigmas = torch.rand(n, generator=g, dtype=dtype) * 4
    sigmas[1::7] = 30.0  # saturating samples
    return t_starts, t_ends, sigmas, ray_indices, n_rays


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_render_weights_native_matches_reference(dtype):
    nat = _native()
    t_starts, t_ends, sigmas, ray_indices, n_rays = _packed(n_rays=40, seed=1, dtype=dtype, max_samples=30)
    outs = []
    for fn in (render_weights_reference, nat.render_weights):
        s = sigmas.clone().requires_grad_()
        a = t_starts.clone().requires_grad_()
        b = t_ends.clone().requires_grad_()
        w, T, al = fn(a, b, s, ray_indices, n_rays)
        g = torch.Generator().manual_seed(2)
        loss = (w * torch.rand(w.shape, generator=g, dtype=dtype)).sum() + (T * torch.rand(w.shape, generator=g, dtype=dtype)).sum() \
            + (al * torch.rand(w.shape, generator=g, dtype=dtype)).sum()
        outs.append((w, T, al) + torch.autograd.grad(loss, (s, a, b)))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for x1, x0 in zip(outs[1], outs[0]):
        torch.testing.assert_close(x1, x0, **tol)


def test_render_weights_gradcheck_both(impl):
    t_starts, t_ends, sigmas, ray_indices, n_rays = _packed(seed=3)
    fn = lambda s, a, b: impl.render_weights(a, b, s, ray_indices, n_rays)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (sigmas.requires_grad_(), t_starts.requires_grad_(), t_ends.requires_grad_()))


def test_render_weights_empty(impl):
    e = torch.zeros(0, dtype=torch.float64)
    w, T, a = impl.render_weights(e, e, e, torch.zeros(0, dtype=torch.int64), 3)
    assert w.shape == T.shape == a.shape == (0,)


def _scene(n_rays, seed, dtype):
    t_starts, t_ends, sigmas, ray_indices, _ = _packed(n_rays=n_rays, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    n = sigmas.numel()
    albedo = torch.rand(n, 3, generator=g, dtype=dtype)
    normals = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=dtype), dim=-1)
    origins = torch.randn(n_rays, 3, generator=g, dtype=dtype)
    directions = torch.nn.functional.normalize(torch.randn(n_rays, 3, generator=g, dtype=dtype), dim=-1)
    lights = torch.randn(n_rays, 3, generator=g, dtype=dtype) * 3
    intensity = torch.rand(n_rays, generator=g, dtype=dtype) + 0.5
    ambient = torch.rand(n_rays, generator=g, dtype=dtype) * 0.3
    return dict(t_starts=t_starts, t_ends=t_ends, ray_indices=ray_indices, n_rays=n_rays, sigmas=sigmas,
                albedo=albedo, normals=normals, origins=origins, directions=directions, light_positions=lights,
                light_intensity=intensity, ambient=ambient)


MODES = ["albedo", "lambertian", "textureless"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_normals", [True, False])
def test_composite_native_matches_reference(mode, dtype, with_normals):
    if not with_normals and mode != "albedo":
        pytest.skip("shading needs normals")
    nat = _native()
    sc = _scene(30, 4, dtype)
    if not with_normals:
        sc["normals"] = None
    results = []
    for fn in (composite_reference, nat.composite):
        s = sc["sigmas"].clone().requires_grad_()
        a = sc["albedo"].clone().requires_grad_()
        n = None if sc["normals"] is None else sc["normals"].clone().requires_grad_()
        out = fn(sc["t_starts"], sc["t_ends"], sc["ray_indices"], sc["n_rays"], s, a, n, sc["origins"], sc["directions"],
                 sc["light_positions"], sc["light_intensity"], sc["ambient"], mode)
        g = torch.Generator().manual_seed(6)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=dtype)).sum() for o in out)
        inputs = (s, a) if n is None else (s, a, n)
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        grads = [torch.zeros_like(i) if gr is None else gr for i, gr in zip(inputs, grads)]
        results.append(list(out) + grads)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for x1, x0 in zip(results[1], results[0]):
        torch.testing.assert_close(x1, x0, **tol)


@pytest.mark.parametrize("mode", MODES)
def test_composite_gradcheck_both(impl, mode):
    sc = _scene(5, 7, torch.float64)
    # keep n.l away from 0, where the clamp has a kink
    fixed = dict(sc)

    def fn(s, a, n):
        return impl.composite(fixed["t_starts"], fixed["t_ends"], fixed["ray_indices"], fixed["n_rays"], s, a, n,
                              fixed["origins"], fixed["directions"], fixed["light_positions"], fixed["light_intensity"],
                              fixed["ambient"], mode)

    inputs = (sc["sigmas"].requires_grad_(), sc["albedo"].requires_grad_(), sc["normals"].requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6)


def test_composite_empty_and_fallback():
    nat = _native()
    e = torch.zeros(0)
    z3 = torch.zeros(0, 3)
    rays = torch.zeros(2, 3)
    out = nat.composite(e, e, torch.zeros(0, dtype=torch.int64), 2, e, z3, z3, rays, rays, rays, torch.ones(2),
                        torch.zeros(2), "lambertian")
    assert [tuple(o.shape) for o in out] == [(2, 3), (2, 1), (2, 1), (2, 3), (0,)]
    assert all(float(o.abs().sum()) == 0 for o in out)
    # gradients w.r.t. light positions are not in the fused kernel: the wrapper uses the reference
    sc = _scene(4, 8, torch.float64)
    lights = sc["light_positions"].requires_grad_()
    rgb = nat.composite(sc["t_starts"], sc["t_ends"], sc["ray_indices"], 4, sc["sigmas"], sc["albedo"], sc["normals"],
                        sc["origins"], sc["directions"], lights, sc["light_intensity"], sc["ambient"], "lambertian")[0]
    rgb.sum().backward()
    assert lights.grad is not None and lights.grad.abs().sum() > 0


def test_composite_autograd_saves_only_inputs():
    """The backward kernel recomputes each ray's sum from the inputs, so composite's autograd saves no output:
    forward and backward dispatch no detach (a saved output costs one when saved and one when unpacked)."""
    nat = _native()

    sc = _scene(6, 3, torch.float32)
    s, a, n = (sc[k].clone().requires_grad_() for k in ("sigmas", "albedo", "normals"))
    with DispatchedOps() as seen:
        out = nat.composite(sc["t_starts"], sc["t_ends"], sc["ray_indices"], 6, s, a, n, sc["origins"],
                            sc["directions"], sc["light_positions"], sc["light_intensity"], sc["ambient"], "lambertian")
        grads = [torch.ones_like(o) for o in out]
        torch.autograd.grad(out, (s, a, n), grads)
    assert seen.names.count("fastdream::composite_fwd") == seen.names.count("fastdream::composite_bwd") == 1
    assert "aten::detach" not in seen.names, seen.names


# ----------------------------------------------------------------------------- cameras
def _camera_draws(B, dtype=torch.float32, seed=0):
    """orbit_cameras' inputs as sample_cameras draws them, with ranges that cross 0 and 360 degrees."""
    g = torch.Generator().manual_seed(seed)
    camera_u, light_noise, light_u = torch.rand(4, B, generator=g), torch.randn(B, 3, generator=g), torch.rand(3, B, generator=g)
    camera_u[:, 0], camera_u[:, 1] = 0.0, 1.0 - 2.0 ** -24  # the ends of [0, 1): overhead and below the horizon
    lo_hi = torch.tensor([(-10.0, 90.0), (-180.0, 540.0), (1.0, 1.5), (45.0, 86.0), (0.8, 1.5), (0.7, 1.0), (0.1, 1.2)])
    lows, spans = lo_hi[:, :1], lo_hi[:, 1:] - lo_hi[:, :1]
    return [t.to(dtype) for t in (camera_u, light_u, light_noise, lows, spans)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wrap,perturb", [(False, 1.0), (True, 0.5)])
def test_orbit_cameras_match_the_reference(dtype, wrap, perturb, device):
    """Native orbit cameras (affine scaling, c2w, light, diffuse share, azimuth wrap) against the twin:
    within 2e-6 in float32 (sin/cos of libm against torch's vectorised ones, a few ulps of values up to 8), 1e-12 in float64."""
    from fastdream.ops.cameras import orbit_cameras_reference

    nat = _native_on(device)
    args = _camera_draws(257, dtype)
    got = nat.orbit_cameras(*[t.to(device) for t in args], 64, 48, perturb, wrap)
    want = orbit_cameras_reference(*args, 64, 48, perturb, wrap)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    assert len(got) == len(want) == 11
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == dtype and g.shape == w.shape, i
        # the wrapped azimuth may land on either side of 360 = 0
        close = (g.cpu() - w).abs() <= tol * max(1.0, w.abs().max().item())
        if i == 6 and wrap:
            close |= ((g.cpu() - w).abs() - 360.0).abs() <= tol * 360
        assert close.all(), (i, (g.cpu() - w).abs().max())
    azimuth = got[6].cpu()
    assert not wrap or ((azimuth >= 0) & (azimuth < 360)).all()
    assert (got[9] >= 0).all() and torch.equal(got[1], got[2])  # ambient above 1 leaves no diffuse light; fx = fy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_camera_rays_match_the_reference(dtype, device):
    """Native pinhole rays (and the per-ray copies of the lights) against the twin for orbit cameras and
    arbitrary poses with off-centre principal points, a non-square image: float32 within 1e-6, float64 1e-14."""
    from fastdream.ops.cameras import camera_rays_reference, orbit_c2w

    nat = _native_on(device)
    g = torch.Generator().manual_seed(3)
    B, H, W = 5, 7, 9
    c2w = orbit_c2w(torch.tensor([0.0, 90.0, -10.0, 45.0, 30.0]), torch.tensor([0.0, 10.0, 200.0, 359.0, 90.0]),
                    torch.tensor([1.0, 2.0, 1.5, 3.0, 1.2]))
    c2w[4, :3, :3] = torch.linalg.qr(torch.randn(3, 3, generator=g))[0]  # any rotation
    per_cam = [torch.rand(B, generator=g) * 10 + 5, torch.rand(B, generator=g) * 10 + 5, torch.rand(B, generator=g) * W,
               torch.rand(B, generator=g) * H, torch.randn(B, 3, generator=g), torch.rand(B, generator=g),
               torch.rand(B, generator=g)]
    args = [t.to(dtype) for t in (c2w, *per_cam)]
    got = nat.camera_rays(*[t.to(device) for t in args], H, W)
    want = camera_rays_reference(*args, H, W)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype and a.shape == b.shape and a.shape[0] == B * H * W, i
        torch.testing.assert_close(a.cpu(), b, atol=tol, rtol=0)
    assert nat.camera_rays(args[0][:0], *[t[:0] for t in args[1:]], H, W)[0].shape == (0, 3)


def test_camera_ops_reject_bad_input():
    from fastdream.errors import FastDreamError

    nat = _native()
    camera_u, light_u, light_noise, lows, spans = _camera_draws(4)
    with pytest.raises(FastDreamError, match="light_u must be"):
        nat.orbit_cameras(camera_u, light_u[:, :3], light_noise, lows, spans, 8, 8, 1.0, False)
    with pytest.raises(FastDreamError, match="lows and spans need 7 values"):
        nat.orbit_cameras(camera_u, light_u, light_noise, lows[:6], spans, 8, 8, 1.0, False)
    c2w, v = torch.eye(4).expand(2, 4, 4), torch.ones(2)
    with pytest.raises(FastDreamError, match="fx needs one value per camera"):
        nat.camera_rays(c2w, torch.ones(3), v, v, v, torch.ones(2, 3), v, v, 4, 4)
    with pytest.raises(FastDreamError, match="c2w must be a"):
        nat.camera_rays(c2w[:, :3], v, v, v, v, torch.ones(2, 3), v, v, 4, 4)


def test_camera_rays_route_to_the_twin_for_gradients():
    """ops.camera_rays is native without gradients and the differentiable twin when the pose requires grad."""
    _native()
    from fastdream import ops
    from fastdream.ops.cameras import orbit_c2w

    c2w = orbit_c2w(torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([2.0])).requires_grad_()
    v, kw = torch.ones(1), dict(fx=torch.full((1,), 4.0), fy=torch.full((1,), 4.0), cx=torch.full((1,), 2.0),
                                cy=torch.full((1,), 2.0), light_position=torch.ones(1, 3), height=4, width=4)
    with ops_use_backend("native"):
        origins, directions, *_ = ops.camera_rays(c2w, light_intensity=v, ambient=v, **kw)
        (directions.sum() + origins.sum()).backward()
        assert c2w.grad is not None and c2w.grad.abs().sum() > 0
        with torch.no_grad():
            native = ops.camera_rays(c2w, light_intensity=v, ambient=v, **kw)
    torch.testing.assert_close(native[1], directions.detach(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- frequency encoding
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims,n_frequencies", [(3, 4), (2, 0), (1, 10)])
def test_frequency_encode_matches_the_reference(dtype, dims, n_frequencies, device):
    """Native against the twin: the same layout, float32 within 2e-6 (libm's sin/cos against torch's, of angles
    up to 2^9 pi), float64 within 1e-12; empty input."""
    from fastdream.ops.frequency_encoding import frequency_encode_reference

    nat = _native_on(device)
    x = torch.randn(300, dims, generator=torch.Generator().manual_seed(0), dtype=dtype)
    got = nat.frequency_encode(x.to(device), n_frequencies).cpu()
    want = frequency_encode_reference(x, n_frequencies)
    assert got.dtype == dtype and got.shape == want.shape == (300, dims * (1 + 2 * n_frequencies))
    torch.testing.assert_close(got, want, atol=2e-6 if dtype == torch.float32 else 1e-12, rtol=0)
    assert nat.frequency_encode(x[:0].to(device), n_frequencies).shape == (0, want.shape[1])


def test_frequency_encode_routes_to_the_twin_for_gradients():
    _native()
    from fastdream import ops
    from fastdream.errors import FastDreamError

    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with ops_use_backend("native"):
        enc = ops.frequency_encode(x, n_frequencies=2)
        enc.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        with torch.no_grad():
            torch.testing.assert_close(ops.frequency_encode(x, n_frequencies=2), enc.detach(), atol=1e-6, rtol=0)
        with pytest.raises(FastDreamError, match="x must be a floating"):
            ops.frequency_encode(x.detach()[0], n_frequencies=2)


# ----------------------------------------------------------------------------- opcheck / compile
def _opcheck_cases():
    nat = _native()
    layout = hash_grid_layout(n_levels=2, log2_hashmap_size=6, base_resolution=4)
    la = nat.layout_args(layout)
    x = torch.rand(10, 3, dtype=torch.float64)
    p = torch.randn(layout.n_params, dtype=torch.float64)
    gy = torch.randn(10, 4, dtype=torch.float64)
    ggx = torch.randn(10, 3, dtype=torch.float64)
    o, d = _march_rays(n=16)
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    binary = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.3
    sc = _scene(6, 9, torch.float64)
    off = nat.ray_offsets(sc["ray_indices"], 6)
    rw = torch.ops.fastdream.render_weights_fwd(sc["t_starts"], sc["t_ends"], sc["sigmas"], off)
    comp_in = [sc["t_starts"], sc["t_ends"], off, sc["sigmas"], sc["albedo"], sc["normals"], sc["origins"],
               sc["directions"], sc["light_positions"], sc["light_intensity"], sc["ambient"], 1]
    comp_out = torch.ops.fastdream.composite_fwd(*comp_in)
    grads = [torch.randn_like(t) for t in comp_out]
    return {
        "hash_encode_fwd": (x.requires_grad_(), p.requires_grad_(), *la),
        "hash_encode_fwd_half": (x.float(), p.half(), *la),
        "hash_encode_bwd": (gy.requires_grad_(), x.detach().requires_grad_(), p.detach().requires_grad_(), *la, True, True),
        "hash_encode_bwd_bwd": (ggx, gy.detach(), x.detach(), p.detach(), *la, True, True),
        "march_rays": (o, d, aabb, binary, 0.0, 1e10, 0.1, 0.01, 1e10),
        "compact_visible_samples": (*_marched(n_rays=8)[:5], 8, 1e-4, 0.0, 40),
        "compact_visible_samples_no_count": (*_marched(n_rays=8)[:4], None, 8, 1e-4, 0.01, 40),
        "occupancy_update": (torch.rand(60), torch.randint(0, 60, (20,)), torch.rand(20), 0.95, 0.5),
        "render_weights_fwd": (sc["t_starts"].requires_grad_(), sc["t_ends"].requires_grad_(),
                               sc["sigmas"].requires_grad_(), off),
        "render_weights_bwd": (torch.randn_like(rw[0]), None, torch.randn_like(rw[0]), sc["t_starts"].detach(),
                               sc["t_ends"].detach(), sc["sigmas"].detach(), off, rw[1], rw[2]),
        "composite_fwd": [t.detach().requires_grad_() if i in (3, 4, 5) else t for i, t in enumerate(comp_in)],
        "orbit_cameras": (*_camera_draws(6, torch.float64), 8, 6, 0.5, True),
        "camera_rays": (torch.eye(4, dtype=torch.float64).repeat(2, 1, 1), *[torch.rand(2, dtype=torch.float64) + 1 for _ in range(4)],
                        torch.randn(2, 3, dtype=torch.float64), torch.rand(2, dtype=torch.float64),
                        torch.rand(2, dtype=torch.float64), 3, 5),
        "frequency_encode": (torch.randn(7, 3, dtype=torch.float64), 3),
        "composite_bwd": (*grads, *[t.detach() if isinstance(t, torch.Tensor) else t for t in comp_in[:-1]], 1, True),
    }


OPCHECK_NAMES = ["hash_encode_fwd", "hash_encode_fwd_half", "hash_encode_bwd", "hash_encode_bwd_bwd", "march_rays",
                 "compact_visible_samples", "compact_visible_samples_no_count", "occupancy_update", "render_weights_fwd", "render_weights_bwd", "composite_fwd", "composite_bwd",
                 "orbit_cameras", "camera_rays", "frequency_encode"]


@pytest.mark.parametrize("name", OPCHECK_NAMES)
def test_opcheck(name):
    cases = _opcheck_cases()
    op = getattr(torch.ops.fastdream, name.replace("_half", "").replace("_no_count", "")).default
    torch.library.opcheck(op, tuple(cases[name]))


def test_hash_encode_under_torch_compile():
    nat = _native()
    layout = hash_grid_layout(n_levels=3, log2_hashmap_size=8, base_resolution=4)
    x = torch.rand(33, 3)
    p = torch.randn(layout.n_params, requires_grad=True)

    def f(x, p):
        return (nat.hash_encode(x, p, layout) ** 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss_c = compiled(x, p)
    (g_c,) = torch.autograd.grad(loss_c, p)
    loss_e = f(x, p)
    (g_e,) = torch.autograd.grad(loss_e, p)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(g_c, g_e)


# ----------------------------------------------------------------------------- CUDA vs reference
@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("params_dtype", [torch.float32, torch.float16])
def test_cuda_hash_encode_matches_reference(params_dtype):
    nat = _native_on("cuda")
    layout = hash_grid_layout()
    x = _hash_points(layout, n=4096).cuda()
    params = (torch.randn(layout.n_params, device="cuda") * 0.1).to(params_dtype)
    outs = []
    for fn in (hash_encode_reference, nat.hash_encode):
        xx = x.clone().requires_grad_()
        pp = params.clone().requires_grad_()
        y = fn(xx, pp, layout)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).cuda()
        outs.append((y,) + torch.autograd.grad(y, (xx, pp), g))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    tol = 1e-3 if params_dtype == torch.float16 else 1e-4  # half: summed in float, rounded once
    torch.testing.assert_close(gp1.float(), gp0.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(gx1, gx0, rtol=1e-3, atol=1e-5 * max(layout.scales))


@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA GPU")
def test_cuda_hash_encode_double_backward():
    nat = _native_on("cuda")
    layout = hash_grid_layout(n_levels=3, log2_hashmap_size=5, base_resolution=3)
    x = (torch.rand(12, 3, dtype=torch.float64, device="cuda") * 0.8 + 0.1).requires_grad_()
    p = torch.randn(layout.n_params, dtype=torch.float64, device="cuda").requires_grad_()
    fn = lambda xx, pp: nat.hash_encode(xx, pp, layout)  # noqa: E731
    # parameter gradients are summed with atomics: another order, last-bit differences between runs
    assert torch.autograd.gradcheck(fn, (x, p), nondet_tol=1e-12)
    assert torch.autograd.gradgradcheck(fn, (x, p), nondet_tol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("case", MARCH_CASES[:3], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cuda_march_matches_reference(case):
    nat = _native_on("cuda")
    origins, directions = _march_rays(n=512)
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    binary = torch.rand(16, 16, 16, generator=torch.Generator().manual_seed(5)) > 0.6
    kw = dict(near=0.0, far=1e10, cone_angle=0.0, max_step_size=1e10)
    kw.update(case)
    ref = march_rays_reference(origins, directions, aabb, binary, **kw)  # CPU reference
    out = nat.march_rays(origins.cuda(), directions.cuda(), aabb.cuda(), binary.cuda(), **kw)
    for a, b in zip(ref, out):
        assert torch.equal(a, b.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_render_weights_and_composite_match_reference(mode):
    nat = _native_on("cuda")
    sc = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _scene(64, 10, torch.float32).items()}
    results = []
    for fn in (composite_reference, nat.composite):
        s = sc["sigmas"].clone().requires_grad_()
        a = sc["albedo"].clone().requires_grad_()
        n = sc["normals"].clone().requires_grad_()
        out = fn(sc["t_starts"], sc["t_ends"], sc["ray_indices"], sc["n_rays"], s, a, n, sc["origins"],
                 sc["directions"], sc["light_positions"], sc["light_intensity"], sc["ambient"], mode)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device="cuda").reshape(o.shape)).sum() for o in out)
        results.append(list(out) + list(torch.autograd.grad(loss, (s, a, n), allow_unused=True)))
    for x1, x0 in zip(results[1], results[0]):
        if x0 is None:
            assert x1 is None or x1.abs().max() == 0
            continue
        torch.testing.assert_close(x1, x0, rtol=1e-4, atol=1e-5)
    w0 = render_weights_reference(sc["t_starts"], sc["t_ends"], sc["sigmas"], sc["ray_indices"], sc["n_rays"])
    w1 = nat.render_weights(sc["t_starts"], sc["t_ends"], sc["sigmas"], sc["ray_indices"], sc["n_rays"])
    for a, b in zip(w0, w1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_info_reports_backend_and_accelerators():
    from fastdream.diagnostics import collect_info, format_info

    data = collect_info()
    assert set(data["optional"]) == {"xformers", "tinycudann", "nerfacc", "open_clip", "ray"}
    assert "native extension" in format_info(data) and data["torch"] == torch.__version__
    if data["native"]["built"]:
        assert "cpu" in data["native"]["devices"]


@pytest.mark.slow
def test_fit_path_native_reaches_reference_psnr(tmp_path, monkeypatch):
    """The whole fit path (marching, hash grid, compositing, occupancy) with each backend: same PSNR."""
    _native()
    from fastdream.data import load_dataset
    from fastdream.demo import write_demo_dataset
    from fastdream.fit import demo_configs, fit

    folder = write_demo_dataset(tmp_path / "data", width=24, n_train=8, n_test=2)
    train, test = load_dataset(folder)
    psnr = {}
    for backend in ("torch", "native"):
        field_cfg, render_cfg, fit_cfg = demo_configs(steps=40)
        fit_cfg.rays_per_step = 512
        with ops_use_backend(backend):
            metrics = fit(train, test, tmp_path / backend, field_cfg, render_cfg, fit_cfg, progress=False)
        psnr[backend] = metrics["psnr"]
    assert psnr["native"] > 15.0, psnr
    assert abs(psnr["native"] - psnr["torch"]) < 1.0, psnr
