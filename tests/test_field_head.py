"""The per-point field ops (ray_points, probe_points, field_head): native against the PyTorch twins
(fastdream/ops/field_head.py), forward and backward, gradcheck in float64, opcheck, and the field's query and
density through them against the field computed with the twins.

Tolerances: float32 within 1e-5 relative (1e-6 absolute) forward (normals 1e-4: they difference two
densities) and 1e-4 relative for gradients, float64
within 1e-12 (the native code does the twin's float operations in its order; sqrt, exp and the ATen
vectorised kernels may round the last bit differently).
"""
from __future__ import annotations

import pytest
import torch

from dispatched import DispatchedOps
from fastdream import _backend, ops
from fastdream.field import FieldConfig, HashGridField
from fastdream.ops.field_head import field_head_reference, probe_points_reference, ray_points_reference

TINY = dict(n_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=32, hidden_dim=16)
HEADS = [dict(blob_shape="linear", activation="exp", density_bias=0.0, blob_density=10.0),
         dict(blob_shape="gaussian", activation="exp", density_bias=-1.0, blob_density=5.0),
         dict(blob_shape="linear", activation="softplus", density_bias=0.5, blob_density=0.0),
         dict(blob_shape="gaussian", activation="softplus", density_bias=0.0, blob_density=3.0)]


def _native():
    if _backend.extension() is None:
        pytest.skip(f"native extension not built ({_backend.extension_error()})")
    from fastdream.ops import _native as nat
    return nat


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


def _head_inputs(n, k, dtype, seed=0):
    """Points around a box centre and raw MLP outputs spanning the truncated exp's clamp (pre-activations
    from far below -15 to above 15) and both sides of softplus' threshold."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 1.6 - 0.8).to(dtype)
    raw = torch.randn(n * k, 4, generator=g, dtype=torch.float64).to(dtype)
    raw[: 4 * k : k, 0] = torch.tensor([-80.0, 60.0, 80.0, 14.0], dtype=dtype)  # the blob adds at most +-20
    centre = torch.tensor([0.05, -0.1, 0.02], dtype=dtype)
    return raw, x, centre


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"{h['blob_shape']}-{h['activation']}-{h['blob_density']}")
def test_field_head_native_matches_reference(dtype, k, head):
    nat = _native()
    raw, x, centre = _head_inputs(50, k, dtype)
    args = dict(k=k, step=0.02, blob_radius=0.5, with_albedo=True, **head)
    raw_n, raw_r = raw.clone().requires_grad_(), raw.clone().requires_grad_()
    got, want = nat.field_head(raw_n, x, centre, **args), field_head_reference(raw_r, x, centre, **args)
    assert (got[2] is None) == (want[2] is None) == (k == 1)
    outs = [(g, w) for g, w in zip(got, want) if w is not None]
    for i, (g, w) in enumerate(outs):
        # normals difference two densities: a last-bit difference of each grows by sigma / |difference|
        loose = i == 2 and dtype == torch.float32
        torch.testing.assert_close(g, w, **(dict(rtol=1e-4, atol=1e-4) if loose else _tol(dtype)))
    seeds = [torch.randn(w.shape, generator=torch.Generator().manual_seed(i), dtype=dtype) for i, (_, w) in enumerate(outs)]
    (g_n,) = torch.autograd.grad(sum((g * s).sum() for (g, _), s in zip(outs, seeds)), raw_n)
    (g_r,) = torch.autograd.grad(sum((w * s).sum() for (_, w), s in zip(outs, seeds)), raw_r)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else _tol(dtype)
    torch.testing.assert_close(g_n, g_r, **tol)
    if head["activation"] == "exp":  # above the clamp the truncated exp passes nothing
        assert g_n[: 4 * k : k, 0][1:3].abs().max() == 0 and g_n[: 4 * k : k, 0][0] != 0


@pytest.mark.parametrize("k", [1, 7])
def test_field_head_gradcheck_float64(k):
    """The hand-written backward (field_head_bwd) against finite differences, each output alone and all
    together, so that a missing (None) output gradient counts as zero."""
    nat = _native()
    raw, x, centre = _head_inputs(6, k, torch.float64, seed=1)
    raw[: 4 * k : k, 0] = 0.3  # away from the clamp's kink, where finite differences are meaningless
    for head in HEADS:
        args = dict(k=k, step=0.05, blob_radius=0.5, with_albedo=True, **head)
        fn = lambda r: tuple(t for t in nat.field_head(r, x, centre, **args) if t is not None)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (raw.clone().requires_grad_(),))
        only_sigma = lambda r: nat.field_head(r, x, centre, **args)[0]  # noqa: E731
        assert torch.autograd.gradcheck(only_sigma, (raw.clone().requires_grad_(),))


def test_field_head_without_albedo_and_bad_input():
    nat = _native()
    raw, x, centre = _head_inputs(10, 1, torch.float32)
    sigma, albedo, normals = nat.field_head(raw, x, centre, k=1, step=0.01, blob_radius=0.5, with_albedo=False,
                                            **HEADS[0])
    assert albedo is None and normals is None and sigma.shape == (10,)
    with pytest.raises(Exception, match="raw must be"):
        ops.field_head(raw[:-1], x, centre=centre, k=1)
    with pytest.raises(Exception, match="k .* must be 1 or 7"):
        ops.field_head(raw, x, centre=centre, k=3)
    with pytest.raises(RuntimeError, match="raw must be"):
        torch.ops.fastdream.field_head_fwd(raw[:-1], x, centre, 1, 0.01, 0.0, 1.0, 0.5, 1, 0, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ray_and_probe_points_native_match_reference(dtype):
    nat = _native()
    g = torch.Generator().manual_seed(3)
    o, d = torch.randn(9, 3, generator=g, dtype=dtype), torch.randn(9, 3, generator=g, dtype=dtype)
    ri = torch.sort(torch.randint(0, 9, (70,), generator=g))[0]
    ts = torch.rand(70, generator=g, dtype=dtype) * 2
    te = ts + torch.rand(70, generator=g, dtype=dtype) * 0.1
    torch.testing.assert_close(nat.ray_points(ts, te, ri, o, d), ray_points_reference(ts, te, ri, o, d), rtol=0, atol=0)
    x = torch.rand(40, 3, generator=g, dtype=dtype) * 2.4 - 1.2  # some outside the box: clamped
    scale, offset = torch.tensor([0.5, 0.25, 0.5], dtype=dtype), torch.tensor([0.5, 0.5, 0.5], dtype=dtype)
    for k in (1, 7):
        got, want = nat.probe_points(x, scale, offset, 0.03, k), probe_points_reference(x, scale, offset, 0.03, k)
        assert got.shape == (40 * k, 3) and got.min() == 0 and got.max() == 1
        torch.testing.assert_close(got, want, **_tol(dtype))


def test_opcheck_field_ops():
    _native()
    raw, x, centre = _head_inputs(8, 7, torch.float64)
    scalars = (7, 0.02, 0.0, 10.0, 0.5, 1, 0)
    fwd = torch.ops.fastdream.field_head_fwd(raw, x, centre, *scalars, True)
    g = [torch.randn_like(t) for t in fwd]
    ri = torch.tensor([0, 0, 1, 2, 2, 2])
    cases = {
        "ray_points": (torch.randn(3, 3), torch.randn(3, 3), ri, torch.rand(6), torch.rand(6) + 1),
        "probe_points": (x, torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64), 0.02, 7),
        "field_head_fwd": (raw.clone().requires_grad_(), x, centre, *scalars, True),
        "field_head_bwd": (*g, raw, x, centre, *scalars),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.fastdream, name).default, args)
    k1 = (raw[:8].clone().requires_grad_(), x, centre, 1, 0.02, 0.0, 10.0, 0.5, 2, 1, False)
    torch.library.opcheck(torch.ops.fastdream.field_head_fwd.default, k1)


@pytest.mark.parametrize("normals", [False, True])
def test_field_query_and_density_match_the_twins(normals):
    """The field routed through the native ops gives the outputs and parameter gradients of the same field on
    the PyTorch twins (backend "torch"), in float64 (in float32 the finite-difference normals lose digits to
    cancellation, as any difference of nearby densities does)."""
    _native()
    torch.manual_seed(0)
    field = HashGridField(config=FieldConfig(**TINY, init_scale=0.5, density_bias=-0.5)).double()
    x = torch.rand(64, 3, dtype=torch.float64) * 1.6 - 0.8
    results = []
    for backend in ("native", "torch"):
        with ops.use_backend(backend):
            sigma, albedo, n = field.query(x, need_normals=normals)
            loss = (sigma * torch.linspace(0, 1, 64, dtype=torch.float64)).sum() + albedo.square().sum() + (n[:, 1].sum() if normals else 0)
            grads = torch.autograd.grad(loss, list(field.parameters()))
            results.append((sigma, albedo, n, field.density(x), *grads))
    for got, want in zip(*results):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_field_query_dispatches_few_ops():
    """The op budget of the training step's field query (ATen ops per step, bench_overhead): with the native ops, the
    query with finite-difference normals is six ops (probe points, encoding, three MLP layers, head) and its
    backward through the head one op, where the PyTorch head alone takes about 25 forward and 35 backward."""
    _native()

    torch.manual_seed(0)
    field = HashGridField(config=FieldConfig(**TINY))
    x = torch.rand(32, 3) - 0.5
    with ops.use_backend("native"):
        field.query(x, need_normals=True)  # the MLP's weight transposes are made once, outside the count
        with DispatchedOps() as forward:
            sigma, albedo, normals = field.query(x, need_normals=True)
        loss = sigma.sum() + albedo.sum() + normals.sum()
        with DispatchedOps() as backward:
            loss.backward()
    assert forward.names == ["fastdream::probe_points", "fastdream::hash_encode_fwd", "aten::_addmm_activation",
                             "aten::_addmm_activation", "aten::addmm", "fastdream::field_head_fwd"], forward.names
    between = backward.names[backward.names.index("fastdream::field_head_bwd") + 1:]
    assert between[0] == "aten::t" and "fastdream::field_head_bwd" in backward.names  # straight into the MLP's backward
    assert len(backward.names) <= 40, backward.names
