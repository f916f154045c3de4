"""The NeRF regularisers: the autograd Functions against the same losses written as autograd expressions, their
hand-written backward against finite differences (float64), the distortion loss against its pairwise definition, and
the near-camera gradient scaling against its formula."""
import pytest
import torch

from fastdream.regularizers import (OpacityTerms, OrientationLoss, distortion_loss, opacity_entropy, opacity_sparsity,
                                    opacity_terms, orientation_loss, scale_gradients_near_camera)


def _rays(dtype=torch.float32, n_rays=6, n_samples=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    normals = torch.nn.functional.normalize(torch.randn(n_samples, 3, generator=g, dtype=dtype), dim=-1)
    directions = torch.nn.functional.normalize(torch.randn(n_rays, 3, generator=g, dtype=dtype), dim=-1)
    ray_indices = torch.sort(torch.randint(0, n_rays - 1, (n_samples,), generator=g)).values  # the last ray: empty
    weights = torch.rand(n_samples, generator=g, dtype=dtype)
    opacity = torch.zeros(n_rays, dtype=dtype).index_add_(0, ray_indices, weights).clamp(0, 1)
    return normals, weights, directions, ray_indices, opacity


def _orientation_reference(normals, weights, directions, ray_indices, opacity):
    facing = (normals * directions[ray_indices]).sum(-1).clamp_min(0.0)
    return torch.dot(weights.detach(), facing.square()) / torch.count_nonzero(opacity).clamp_min(1)


def test_orientation_loss_matches_the_autograd_expression():
    normals, weights, directions, ray_indices, opacity = _rays()
    weights.requires_grad_(True)
    n1 = normals.clone().requires_grad_(True)
    n2 = normals.clone().requires_grad_(True)
    got = orientation_loss(weights, n1, directions, ray_indices, opacity=opacity)
    expected = _orientation_reference(n2, weights, directions, ray_indices, opacity)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    (got * 3.0).backward()
    (expected * 3.0).backward()
    torch.testing.assert_close(n1.grad, n2.grad, rtol=1e-6, atol=1e-7)
    assert n1.grad.abs().sum() > 0
    assert weights.grad is None  # the rendering weights are stop-gradient
    # divided by the rays that see anything: 5 of the 6 here
    assert int(torch.count_nonzero(opacity)) == 5


def test_orientation_loss_gradcheck():
    normals, weights, directions, ray_indices, opacity = _rays(torch.float64)
    normals.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda n: OrientationLoss.apply(n, weights, directions, ray_indices, opacity),
                                    (normals,))


def test_opacity_terms_match_the_separate_regularisers():
    g = torch.Generator().manual_seed(1)
    # empty and opaque rays (inside the entropy's clamp: no gradient there) and everything between
    a = torch.cat([torch.zeros(3), torch.ones(2), torch.rand(40, generator=g)])
    a1, a2 = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    got = torch.stack(opacity_terms(a1))
    expected = torch.stack([opacity_entropy(a2), opacity_sparsity(a2)])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    weights = torch.tensor([0.3, 2.0])
    torch.dot(got, weights).backward()
    torch.dot(expected, weights).backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-5, atol=1e-7)
    # empty and opaque rays: the entropy is clamped there, only the sparsity pulls
    torch.testing.assert_close(a1.grad[:5], 2.0 * a[:5] / torch.sqrt(a[:5] ** 2 + 0.01) / a.numel())


@pytest.mark.parametrize("which", [0, 1])
def test_opacity_terms_gradcheck(which):
    g = torch.Generator().manual_seed(2)
    a = (torch.rand(30, generator=g, dtype=torch.float64) * 0.98 + 0.01).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: OpacityTerms.apply(x, 1e-5)[which], (a,))


def _packed_rays(counts, generator):
    """Sorted intervals per ray, packed ray by ray, plus three zero-weight padding slots (as fixed-capacity
    rendering leaves them)."""
    ray_indices, t_starts, t_ends = [], [], []
    for ray, count in enumerate(counts):
        edges = torch.sort(torch.rand(count + 1, generator=generator, dtype=torch.float64) * 5.0 + 1.0).values
        ray_indices.append(torch.full((count,), ray))
        t_starts.append(edges[:-1])
        t_ends.append(edges[1:])
    weights = torch.rand(sum(counts), generator=generator, dtype=torch.float64)
    pad = torch.zeros(3, dtype=torch.float64)
    return (torch.cat([weights, pad]), torch.cat(t_starts + [pad]), torch.cat(t_ends + [pad]),
            torch.cat(ray_indices + [torch.zeros(3, dtype=torch.long)]))


def _distortion_pairwise(weights, t_starts, t_ends, ray_indices, n_rays):
    """mip-NeRF 360's eq. 15 summed over every pair of samples of each ray, averaged over the rays."""
    mid = 0.5 * (t_starts + t_ends)
    total = weights.new_zeros(())
    for ray in range(n_rays):
        on = ray_indices == ray
        w, m = weights[on], mid[on]
        total = total + (w[:, None] * w[None, :] * (m[:, None] - m[None, :]).abs()).sum()
        total = total + (w.square() * (t_ends[on] - t_starts[on])).sum() / 3.0
    return total / n_rays


def test_distortion_loss_matches_the_pairwise_sum_and_its_gradient():
    generator = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1, 7]
    weights, t_starts, t_ends, ray_indices = _packed_rays(counts, generator)
    weights.requires_grad_(True)
    fast = distortion_loss(weights, t_starts, t_ends, ray_indices, len(counts))
    (grad_fast,) = torch.autograd.grad(fast, weights)
    slow = _distortion_pairwise(weights, t_starts, t_ends, ray_indices, len(counts))
    (grad_slow,) = torch.autograd.grad(slow, weights)
    assert torch.allclose(fast, slow, rtol=1e-6), (float(fast), float(slow))
    real = slice(0, sum(counts))  # padding slots have zero-length intervals: no gradient reaches the field there
    assert torch.allclose(grad_fast[real], grad_slow[real], rtol=1e-6, atol=1e-9)


def test_distortion_loss_prefers_one_surface_to_haze():
    """All of a ray's weight in one short interval costs far less than the same weight spread along the ray."""
    edges = torch.linspace(1.0, 5.0, 41)
    t_starts, t_ends, rays = edges[:-1], edges[1:], torch.zeros(40, dtype=torch.long)
    haze = torch.full((40,), 1.0 / 40)
    surface = torch.zeros(40)
    surface[20] = 1.0
    assert distortion_loss(surface, t_starts, t_ends, rays, 1) * 10 < distortion_loss(haze, t_starts, t_ends, rays, 1)


def test_near_camera_gradient_scaling_scales_each_sample_by_its_distance():
    """Forward unchanged; each sample's gradient (per-sample (N,) and (N, C) outputs alike) times
    min(1, (t_mid / d)^2); an absent output passes through as None."""
    g = torch.Generator().manual_seed(0)
    t_starts = torch.rand(50, generator=g) * 4.0
    t_ends = t_starts + 0.05
    sigmas, albedo = torch.rand(50, generator=g).requires_grad_(), torch.rand(50, 3, generator=g).requires_grad_()
    out_sigmas, out_albedo, none = scale_gradients_near_camera(t_starts, t_ends, 2.0, sigmas, albedo, None)
    assert none is None and torch.equal(out_sigmas, sigmas) and torch.equal(out_albedo, albedo)
    up_s, up_a = torch.randn(50, generator=g), torch.randn(50, 3, generator=g)
    grad_s, grad_a = torch.autograd.grad((out_sigmas * up_s).sum() + (out_albedo * up_a).sum(), (sigmas, albedo))
    scale = (((t_starts + t_ends) / 2) / 2.0).square().clamp(max=1.0)
    assert (scale < 1).any() and (scale == 1).any()  # both sides of the clamp are exercised
    torch.testing.assert_close(grad_s, up_s * scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_a, up_a * scale[:, None], rtol=1e-6, atol=0)
