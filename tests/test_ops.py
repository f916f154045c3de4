"""Reference ops against independent re-statements and closed forms."""
import math

import numpy as np
import pytest
import torch

from fastdream import ops
from fastdream.errors import InputError
from fastdream.ops.hash_encoding import hash_encode_reference
from fastdream.ops.marching import march_rays_reference

# 4 levels at resolutions 4, 8, 16, 32 with a 2^10 table: levels 0-1 dense, levels 2-3 hashed.
SMALL = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)


def tcnn_encode_slow(x, params, n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale):
    """tiny-cuda-nn's HashGrid rules, restated with explicit loops over levels, points and corners."""
    F = n_features_per_level
    x = np.asarray(x, dtype=np.float32)
    params = np.asarray(params, dtype=np.float64)
    out = np.zeros((x.shape[0], n_levels * F))
    log2_scale = np.float32(np.log2(np.float32(per_level_scale)))
    offset = 0
    for level in range(n_levels):
        scale = np.float32(np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1.0))
        res = int(math.ceil(scale)) + 1
        size = min(((res ** 3) + 7) // 8 * 8, 2 ** log2_hashmap_size)
        for i in range(x.shape[0]):
            pos = [np.float32(scale) * x[i, d] + np.float32(0.5) for d in range(3)]
            grid = [int(math.floor(p)) for p in pos]
            frac = [float(p) - g for p, g in zip(pos, grid)]
            for corner in range(8):
                c = [grid[d] + ((corner >> d) & 1) for d in range(3)]
                if res ** 3 <= size:
                    index = c[0] + c[1] * res + c[2] * res * res
                else:
                    index = ((c[0] * 1) ^ (c[1] * 2654435761) ^ (c[2] * 805459861)) & 0xFFFFFFFF
                index %= size
                w = 1.0
                for d in range(3):
                    w *= frac[d] if (corner >> d) & 1 else 1.0 - frac[d]
                out[i, level * F:(level + 1) * F] += w * params[(offset + index) * F:(offset + index + 1) * F]
        offset += size
    assert offset * F == params.shape[0]
    return out


def test_param_count_matches_tcnn_rules():
    # levels 0,1 dense: 64 and 512 vectors; levels 2,3 capped at 1024 -> 2624 vectors * 2 features
    assert ops.hash_grid_n_params(**SMALL) == (64 + 512 + 1024 + 1024) * 2
    layout = ops.hash_grid_layout(**SMALL)
    assert layout.resolutions == [4, 8, 16, 32]
    assert layout.hashed == [False, False, True, True]
    # default config: 16 levels from 16 to 2048, 2^19 table (tcnn gives 12196240 parameters for it)
    assert ops.hash_grid_n_params() == 12196240


def test_hash_encode_matches_slow_tcnn_restatement():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, generator=g)
    x[0] = 0.0
    x[1] = 1.0
    x[2] = torch.tensor([0.25, 0.5, 0.75])  # exactly on cell boundaries of several levels
    params = torch.randn(ops.hash_grid_n_params(**SMALL), generator=g)
    got = ops.hash_encode(x, params, **SMALL)
    want = tcnn_encode_slow(x.numpy(), params.numpy(), **SMALL)
    assert got.shape == (64, 8)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_hash_encode_non_integer_scale_levels():
    cfg = dict(n_levels=3, n_features_per_level=4, log2_hashmap_size=9, base_resolution=5, per_level_scale=1.7)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, generator=g)
    params = torch.randn(ops.hash_grid_n_params(**cfg), generator=g)
    np.testing.assert_allclose(ops.hash_encode(x, params, **cfg).numpy(), tcnn_encode_slow(x.numpy(), params.numpy(), **cfg), rtol=1e-5, atol=1e-5)


def test_hash_encode_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    # one dense level (4^3 = 64 vectors) and one hashed level (8^3 > 64)
    layout = ops.hash_grid_layout(n_levels=2, n_features_per_level=2, log2_hashmap_size=6, base_resolution=4, per_level_scale=2.0)
    assert layout.hashed == [False, True]
    x = (torch.rand(6, 3, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    params = torch.randn(layout.n_params, generator=g, dtype=torch.float64, requires_grad=True)
    # points are away from cell boundaries for eps=1e-6 with overwhelming probability
    assert torch.autograd.gradcheck(lambda a, b: hash_encode_reference(a, b, layout), (x, params), eps=1e-6, atol=1e-5)


def test_hash_encode_rejects_bad_input():
    params = torch.zeros(ops.hash_grid_n_params(**SMALL))
    with pytest.raises(InputError, match=r"\(N, 3\)"):
        ops.hash_encode(torch.rand(4, 2), params, **SMALL)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ops.hash_encode(torch.rand(4, 3) + 1.0, params, **SMALL)
    with pytest.raises(InputError, match="needs"):
        ops.hash_encode(torch.rand(4, 3), params[:-2], **SMALL)
    with pytest.raises(InputError, match="floating"):
        ops.hash_encode(torch.zeros(4, 3, dtype=torch.int64), params, **SMALL)


def _slab(n_rays=3, n_samples=10, length=2.0, sigma=1.3):
    dt = length / n_samples
    starts = torch.arange(n_samples, dtype=torch.float64) * dt
    t_starts = starts.repeat(n_rays)
    t_ends = t_starts + dt
    ray_indices = torch.arange(n_rays).repeat_interleave(n_samples)
    sigmas = torch.full_like(t_starts, sigma)
    return t_starts, t_ends, sigmas, ray_indices


def test_constant_density_slab_closed_form():
    t_starts, t_ends, sigmas, ray_indices = _slab()
    weights, trans, alphas = ops.render_weights(t_starts, t_ends, sigmas, ray_indices=ray_indices, n_rays=3)
    opacity = ops.accumulate_along_rays(weights, ray_indices=ray_indices, n_rays=3)
    np.testing.assert_allclose(opacity.numpy()[:, 0], 1 - math.exp(-1.3 * 2.0), rtol=1e-12)
    # exclusive transmittance: the first sample sees T = 1, the k-th sees exp(-sigma * k * dt)
    np.testing.assert_allclose(trans[:10].numpy(), np.exp(-1.3 * 0.2 * np.arange(10)), rtol=1e-12)
    np.testing.assert_allclose(alphas.numpy(), 1 - math.exp(-1.3 * 0.2), rtol=1e-12)


def test_render_weights_match_per_ray_loop_and_sum_to_opacity():
    g = torch.Generator().manual_seed(3)
    counts = [0, 5, 1, 7]  # includes a ray without samples
    ray_indices = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    t_starts = torch.cat([torch.sort(torch.rand(c, generator=g) * 3).values for c in counts])
    t_ends = t_starts + torch.rand(t_starts.shape, generator=g) * 0.1
    sigmas = torch.rand(t_starts.shape, generator=g) * 5
    weights, _, _ = ops.render_weights(t_starts, t_ends, sigmas, ray_indices=ray_indices, n_rays=4)
    expected = []
    for r in range(4):
        T = 1.0
        for s, e, sig in zip(t_starts[ray_indices == r], t_ends[ray_indices == r], sigmas[ray_indices == r]):
            a = 1 - math.exp(-float(sig) * float(e - s))
            expected.append(T * a)
            T *= 1 - a
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-5, atol=1e-7)
    opacity = ops.accumulate_along_rays(weights, ray_indices=ray_indices, n_rays=4)[:, 0]
    assert opacity[0] == 0
    assert bool((opacity <= 1 + 1e-6).all())
    values = torch.rand(len(ray_indices), 3, generator=g)
    colour = ops.accumulate_along_rays(weights, values, ray_indices=ray_indices, n_rays=4)
    np.testing.assert_allclose(colour[3].numpy(), (weights[ray_indices == 3, None] * values[ray_indices == 3]).sum(0).numpy(), rtol=1e-5)


def test_render_weights_gradients_flow():
    t_starts, t_ends, sigmas, ray_indices = _slab(n_rays=2, n_samples=4)
    sigmas = sigmas.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: ops.render_weights(t_starts, t_ends, s, ray_indices=ray_indices, n_rays=2)[0], (sigmas,))


AABB = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])


def _rays(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    origins = torch.randn(n, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    target = (torch.rand(n, 3, generator=g) - 0.5) * 1.6
    directions = torch.nn.functional.normalize(target - origins, dim=-1)
    return origins, directions


def test_march_full_grid_tiles_the_box_interval():
    origins, directions = _rays(32)
    binary = torch.ones(8, 8, 8, dtype=torch.bool)
    ray_indices, t_starts, t_ends = ops.march_rays(origins, directions, aabb=AABB, binary=binary, near=0.0, far=1e10, step_size=0.05)
    t_min, t_max = ops.ray_aabb_intersect(origins, directions, AABB)
    for r in range(32):
        s, e = t_starts[ray_indices == r], t_ends[ray_indices == r]
        assert len(s) > 0
        assert torch.isclose(s[0], t_min[r], atol=1e-6) and torch.isclose(e[-1], t_max[r], atol=1e-5)
        assert torch.allclose(e[:-1], s[1:], atol=1e-5)  # contiguous, no gaps or overlaps
        assert bool((e > s).all())


def test_march_near_far_clip_and_cone_growth():
    origins, directions = _rays(8, seed=1)
    binary = torch.ones(4, 4, 4, dtype=torch.bool)
    ray_indices, t_starts, t_ends = ops.march_rays(origins, directions, aabb=AABB, binary=binary, near=2.5, far=3.0, step_size=0.01,
                                                  cone_angle=0.01)
    assert bool((t_starts >= 2.5 - 1e-6).all()) and bool((t_ends <= 3.0 + 1e-6).all())
    dt = t_ends - t_starts
    # steps grow as t * cone_angle once that exceeds the base step (except the clipped last one)
    last_of_ray = torch.ones_like(ray_indices, dtype=torch.bool)
    last_of_ray[:-1] = ray_indices[1:] != ray_indices[:-1]
    interior = ~last_of_ray  # the last step of a ray is clipped at the box exit or far
    np.testing.assert_allclose(dt[interior].numpy(), np.maximum(t_starts[interior].numpy() * 0.01, 0.01), rtol=1e-5)


def test_march_skips_empty_cells_and_missing_rays():
    g = torch.Generator().manual_seed(4)
    binary = torch.rand(8, 8, 8, generator=g) > 0.7
    origins, directions = _rays(64, seed=2)
    # two rays that miss the box entirely, one parallel to an axis
    origins[:2] = torch.tensor([[5.0, 5.0, 5.0], [0.0, 3.0, 0.0]])
    directions[:2] = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    ray_indices, t_starts, t_ends = ops.march_rays(origins, directions, aabb=AABB, binary=binary, near=0.0, far=1e10, step_size=0.02)
    assert not bool(((ray_indices == 0) | (ray_indices == 1)).any())
    mid = origins[ray_indices] + directions[ray_indices] * ((t_starts + t_ends) / 2)[:, None]
    cell = ((mid + 1) / 2 * 8).floor().long().clamp(0, 7)
    assert bool(binary[cell[:, 0], cell[:, 1], cell[:, 2]].all())
    full = ops.march_rays(origins, directions, aabb=AABB, binary=torch.ones_like(binary), near=0.0, far=1e10,
                          step_size=0.02)[0]
    assert 0 < len(ray_indices) < len(full)
    assert bool((ray_indices[1:] >= ray_indices[:-1]).all())


def test_march_axis_parallel_ray_inside_box():
    origins = torch.tensor([[0.1, 0.2, -3.0]])
    directions = torch.tensor([[0.0, 0.0, 1.0]])
    ray_indices, t_starts, t_ends = march_rays_reference(origins, directions, AABB, torch.ones(2, 2, 2, dtype=torch.bool), 0.0, 1e10, 0.5)
    np.testing.assert_allclose(t_starts.numpy(), [2.0, 2.5, 3.0, 3.5], atol=1e-6)
    np.testing.assert_allclose(t_ends.numpy(), [2.5, 3.0, 3.5, 4.0], atol=1e-6)


def test_shading_modes_match_formula():
    g = torch.Generator().manual_seed(5)
    albedo = torch.rand(10, 3, generator=g)
    normals = torch.nn.functional.normalize(torch.randn(10, 3, generator=g), dim=-1)
    positions = torch.randn(10, 3, generator=g)
    lights = torch.randn(10, 3, generator=g) * 3
    li, amb = torch.rand(10, generator=g), torch.rand(10, generator=g) * 0.3
    to_light = torch.nn.functional.normalize(lights - positions, dim=-1)
    lambert = (normals * to_light).sum(-1).clamp_min(0)
    expected = albedo * (li * lambert + amb)[:, None]
    assert torch.allclose(ops.shade(albedo, normals, positions, lights, li, amb, "lambertian"), expected)
    assert torch.allclose(ops.shade(albedo, normals, positions, lights, li, amb, "textureless"), (li * lambert + amb)[:, None].expand(-1, 3))
    assert torch.equal(ops.shade(albedo, normals, positions, lights, li, amb, "albedo"), albedo)
    with pytest.raises(InputError, match="shading mode"):
        ops.shade(albedo, normals, positions, lights, li, amb, "phong")


def test_composite_reference_matches_separate_ops():
    g = torch.Generator().manual_seed(6)
    t_starts, t_ends, sigmas, ray_indices = _slab(n_rays=2, n_samples=5)
    t_starts, t_ends, sigmas = t_starts.float() + 1, t_ends.float() + 1, torch.rand(10, generator=g) * 3
    albedo = torch.rand(10, 3, generator=g)
    normals = torch.nn.functional.normalize(torch.randn(10, 3, generator=g), dim=-1)
    origins, directions = torch.zeros(2, 3), torch.nn.functional.normalize(torch.randn(2, 3, generator=g), dim=-1)
    lights, li, amb = torch.randn(2, 3, generator=g) * 2, torch.ones(2) * 0.8, torch.ones(2) * 0.2
    rgb, opacity, depth, normal, weights = ops.composite(
        t_starts, t_ends, sigmas, albedo, normals, ray_indices=ray_indices, n_rays=2, origins=origins, directions=directions,
        light_positions=lights, light_intensity=li, ambient=amb, mode="lambertian")
    pos = origins[ray_indices] + directions[ray_indices] * ((t_starts + t_ends) / 2)[:, None]
    colours = ops.shade(albedo, normals, pos, lights[ray_indices], li[ray_indices], amb[ray_indices], "lambertian")
    w = ops.render_weights(t_starts, t_ends, sigmas, ray_indices=ray_indices, n_rays=2)[0]
    assert torch.allclose(weights, w)
    assert torch.allclose(rgb, ops.accumulate_along_rays(w, colours, ray_indices=ray_indices, n_rays=2), atol=1e-6)
    assert torch.allclose(depth[:, 0], ops.accumulate_along_rays(w, ((t_starts + t_ends) / 2)[:, None], ray_indices=ray_indices,
                                                                n_rays=2)[:, 0], atol=1e-6)
    assert torch.allclose(opacity[:, 0], w.reshape(2, 5).sum(1), atol=1e-6)


def test_backend_is_chosen_once_and_switched_on_purpose(monkeypatch):
    from fastdream import _backend
    from fastdream.errors import FastDreamError

    start = _backend.requested_backend()
    monkeypatch.setenv("FASTDREAM_BACKEND", "native" if start != "native" else "torch")
    assert _backend.requested_backend() == start, "the environment is read once, not on every op call"
    with ops.use_backend("torch") as chosen:
        assert chosen == "torch" and ops.backend_name("cpu") == "torch"
        x = torch.rand(7, 3)
        params = torch.rand(ops.hash_grid_n_params(n_levels=2, log2_hashmap_size=6)) * 0.1
        torch.testing.assert_close(ops.hash_encode(x, params, n_levels=2, log2_hashmap_size=6),
                                   hash_encode_reference(x, params, ops.hash_grid_layout(2, 2, 6, 16, None)))
        with ops.use_backend(None):
            assert _backend.requested_backend() == "torch"
    assert _backend.requested_backend() == start
    with pytest.raises(FastDreamError, match="'fast' is not understood"):
        ops.use_backend("fast").__enter__()
    assert _backend.requested_backend() == start


def test_a_bad_backend_environment_variable_is_one_clear_error():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, FASTDREAM_BACKEND="cuda-please", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "fastdream.cli", "run", "a cat", "--out", "never", "--steps", "1"],
                          env=env, cwd=root, capture_output=True, text=True)
    assert proc.returncode == 2 and "FASTDREAM_BACKEND='cuda-please' is not understood" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (root / "never").exists()
