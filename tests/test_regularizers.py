"""Regularisers checked against their definitions written out pairwise."""
from __future__ import annotations

import torch

from fastdream.regularizers import distortion_loss


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
