"""Differentiable triangle rasterization in plain PyTorch: the twins of the native rasterize / interpolate /
antialias kernels (csrc/kernels/rasterize_impl.h), the fallback and the oracle in tests.

Conventions as nvdiffrast: pos (B, V, 4) homogeneous clip coordinates, tri (F, 3) int64; pixel (row r,
column c) of an H x W image has its centre at NDC ((2c + 1) / W - 1, (2r + 1) / H - 1) (row 0 is y = -1).
Barycentrics are perspective-correct: b = k / sum(k), k = a x c with a_i = x_i - px w_i, c_i = y_i - py w_i.
A pixel is covered when every b_i >= 0 and z / w lies in [-1, 1]; the nearest triangle wins, ties to the
lower id. Triangles with a vertex at w <= 0 are not drawn.
"""
from __future__ import annotations

import torch

from ..errors import FastDreamError

_CHUNK_ELEMENTS = 1 << 22  # pixels x triangles tested per step of the reference z-buffer (bounds its memory)


def check_mesh_inputs(pos: torch.Tensor, tri: torch.Tensor) -> None:
    if pos.dim() != 3 or pos.shape[-1] != 4 or not pos.is_floating_point():
        raise FastDreamError(f"rasterize: pos must be a float (B, V, 4) tensor of clip coordinates, got "
                             f"{tuple(pos.shape)} {pos.dtype}.")
    if tri.dim() != 2 or tri.shape[-1] != 3 or tri.dtype != torch.int64:
        raise FastDreamError(f"rasterize: tri must be an int64 (F, 3) tensor of vertex indices, got "
                             f"{tuple(tri.shape)} {tri.dtype}.")
    if tri.numel() and (int(tri.min()) < 0 or int(tri.max()) >= pos.shape[1]):
        raise FastDreamError(f"rasterize: tri holds vertex indices outside [0, {pos.shape[1]}).")


def pixel_centres(height: int, width: int, like: torch.Tensor):
    """NDC (py (H, 1), px (1, W)) of the pixel centres."""
    ys = (2 * torch.arange(height, device=like.device, dtype=like.dtype) + 1) / height - 1
    xs = (2 * torch.arange(width, device=like.device, dtype=like.dtype) + 1) / width - 1
    return ys[:, None], xs[None, :]


def _barycentrics(p0, p1, p2, px, py):
    """Perspective-correct barycentrics (..., 3) and their denominator sum(k); p_i (..., 4)."""
    a = torch.stack([p0[..., 0] - px * p0[..., 3], p1[..., 0] - px * p1[..., 3], p2[..., 0] - px * p2[..., 3]], -1)
    c = torch.stack([p0[..., 1] - py * p0[..., 3], p1[..., 1] - py * p1[..., 3], p2[..., 1] - py * p2[..., 3]], -1)
    k = torch.linalg.cross(a, c, dim=-1)
    s = k.sum(-1, keepdim=True)
    return k / torch.where(s == 0, torch.ones_like(s), s), s[..., 0]


def _depth(p0, p1, p2, b):
    num = b[..., 0] * p0[..., 2] + b[..., 1] * p1[..., 2] + b[..., 2] * p2[..., 2]
    den = b[..., 0] * p0[..., 3] + b[..., 1] * p1[..., 3] + b[..., 2] * p2[..., 3]
    return num / den


def _zbuffer(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, W) id of the nearest covering triangle, -1 where none; every pixel tests every triangle."""
    B = pos.shape[0]
    py, px = pixel_centres(height, width, pos)
    px, py = px.expand(height, width)[None, ..., None], py.expand(height, width)[None, ..., None]
    best_key = torch.full((B, height, width), float("inf"), dtype=torch.float32, device=pos.device)
    best_id = torch.full((B, height, width), -1, dtype=torch.int64, device=pos.device)
    chunk = max(1, _CHUNK_ELEMENTS // (B * height * width))
    for start in range(0, tri.shape[0], chunk):
        ids = torch.arange(start, min(start + chunk, tri.shape[0]), device=pos.device)
        v = pos[:, tri[ids]]  # (B, n, 3, 4)
        p = [v[:, None, None, :, i, :] for i in range(3)]  # (B, 1, 1, n, 4)
        b, s = _barycentrics(p[0], p[1], p[2], px, py)  # (B, H, W, n, 3)
        d = _depth(p[0], p[1], p[2], b)
        front = (v[..., 3] > 0).all(-1)[:, None, None, :]
        ok = front & (s != 0) & (b >= 0).all(-1) & (d >= -1) & (d <= 1)
        # the native z-buffer compares float32 depths mapped to [0, 1]
        key = torch.where(ok, ((d + 1) * 0.5).float(), torch.full_like(d, float("inf"), dtype=torch.float32))
        k_min, arg = key.min(-1)  # first minimum: the lower id among ties
        better = k_min < best_key
        best_key = torch.where(better, k_min, best_key)
        best_id = torch.where(better, ids[arg], best_id)
    return best_id


def rasterize_reference(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int):
    """Returns (tri_id (B, H, W) int64, -1 for background; bary (B, H, W, 2) = (b0, b1); depth (B, H, W) = z / w),
    bary and depth differentiable w.r.t. pos; zeros where no triangle covers the pixel."""
    check_mesh_inputs(pos, tri)
    with torch.no_grad():
        tri_id = _zbuffer(pos.detach(), tri, height, width)
    covered = tri_id >= 0
    t = tri_id.clamp_min(0)
    B = pos.shape[0]
    bidx = torch.arange(B, device=pos.device)[:, None, None]
    p = [pos[bidx, tri[t, i]] for i in range(3)]  # (B, H, W, 4)
    py, px = pixel_centres(height, width, pos)
    b, _ = _barycentrics(p[0], p[1], p[2], px, py)
    d = _depth(p[0], p[1], p[2], b)
    zero = torch.zeros((), dtype=pos.dtype, device=pos.device)
    bary = torch.where(covered[..., None], b[..., :2], zero)
    depth = torch.where(covered, d, zero)
    return tri_id, bary, depth


def interpolate_reference(attr: torch.Tensor, tri_id: torch.Tensor, bary: torch.Tensor, tri: torch.Tensor):
    """attr (V, C) -> (B, H, W, C): b0 attr[v0] + b1 attr[v1] + (1 - b0 - b1) attr[v2], zeros off the mesh;
    differentiable w.r.t. attr and bary."""
    t = tri_id.clamp_min(0)
    a = attr[tri[t]]  # (B, H, W, 3, C)
    b = torch.cat([bary, 1 - bary.sum(-1, keepdim=True)], -1).to(attr.dtype)
    out = (b[..., None] * a).sum(-2)
    return torch.where((tri_id >= 0)[..., None], out, torch.zeros((), dtype=attr.dtype, device=attr.device))


# neighbour offsets (row, column): left, right, down (row - 1), up (row + 1), as the native kernel
_NEIGHBOURS = ((0, -1), (0, 1), (-1, 0), (1, 0))


def _shift(x: torch.Tensor, dr: int, dc: int, fill):
    """y[:, r, c] = x[:, r + dr, c + dc] (fill outside the image)."""
    H, W = x.shape[1], x.shape[2]
    y = torch.full_like(x, fill)
    rs, re = max(0, -dr), min(H, H - dr)
    cs, ce = max(0, -dc), min(W, W - dc)
    y[:, rs:re, cs:ce] = x[:, rs + dr:re + dr, cs + dc:ce + dc]
    return y


def triangle_adjacency(tri: torch.Tensor) -> torch.Tensor:
    """(F, 3) int64: for edge k of each triangle (the edge opposite its vertex k, from vertex k + 1 to k + 2), the
    other triangle with that edge, or -1 when there is none. Only manifold edges (exactly two triangles) have a
    neighbour; boundary and non-manifold edges, and every edge of a degenerate triangle (a repeated vertex), get -1.
    Depends on the topology alone: compute it once per `tri` and pass it to `antialias` as `topology`."""
    if tri.dim() != 2 or tri.shape[-1] != 3 or tri.dtype != torch.int64:
        raise FastDreamError(f"triangle_adjacency: tri must be an int64 (F, 3) tensor of vertex indices, got "
                             f"{tuple(tri.shape)} {tri.dtype}.")
    F = tri.shape[0]
    if F == 0:
        return torch.empty((0, 3), dtype=torch.int64, device=tri.device)
    a, b = tri[:, [1, 2, 0]], tri[:, [2, 0, 1]]  # edge k runs from vertex k + 1 to vertex k + 2
    lo, hi = torch.minimum(a, b).reshape(-1), torch.maximum(a, b).reshape(-1)
    ids = torch.arange(3 * F, device=tri.device)
    degenerate = ((tri[:, 0] == tri[:, 1]) | (tri[:, 1] == tri[:, 2]) | (tri[:, 2] == tri[:, 0])).repeat_interleave(3)
    # one key per undirected edge; each edge of a degenerate triangle gets a key of its own (never matched)
    keys = torch.where(degenerate, -1 - ids, lo * (int(tri.max()) + 1) + hi)
    sorted_keys, order = torch.sort(keys, stable=True)
    _, group, counts = torch.unique_consecutive(sorted_keys, return_inverse=True, return_counts=True)
    start = (torch.cumsum(counts, 0) - counts)[group]
    position = torch.arange(3 * F, device=tri.device)
    partner = torch.where(position == start, position + 1, position - 1).clamp(0, 3 * F - 1)
    paired = counts[group] == 2
    adjacency = torch.full((3 * F,), -1, dtype=torch.int64, device=tri.device)
    adjacency[order[paired]] = order[partner[paired]] // 3
    return adjacency.view(F, 3)


def check_topology(topology: torch.Tensor, tri: torch.Tensor) -> None:
    if (topology.shape != tri.shape or topology.dtype != torch.int64 or topology.device != tri.device):
        raise FastDreamError(f"antialias: topology must be triangle_adjacency(tri), an int64 {tuple(tri.shape)} tensor "
                             f"on {tri.device}, got {tuple(topology.shape)} {topology.dtype} on {topology.device}.")
    if topology.numel() and (int(topology.min()) < -1 or int(topology.max()) >= tri.shape[0]):
        raise FastDreamError(f"antialias: topology holds triangle ids outside [-1, {tri.shape[0]}): it is not "
                             "triangle_adjacency(tri) of these triangles.")


def antialias_reference(color: torch.Tensor, tri_id: torch.Tensor, depth: torch.Tensor, pos: torch.Tensor,
                        tri: torch.Tensor, topology: torch.Tensor = None):
    """Silhouette antialiasing (see csrc/kernels/rasterize_impl.h): for each pixel p and 4-neighbour q covered
    by different triangles, the front one's triangle edge crossed by the segment between the centres at
    fraction alpha blends p += w (c_q - c_p), w = max(0, 1/2 - alpha) if p is in front, max(0, alpha - 1/2)
    otherwise, when that edge is a silhouette: no triangle continues the surface across it (topology, see
    `triangle_adjacency`; computed here when None), or the one that does folds back (its far vertex lies on the
    front triangle's side of the edge on screen), as nvdiffrast's antialias decides. Differentiable w.r.t. color
    and pos."""
    check_mesh_inputs(pos, tri)
    if topology is None:
        topology = triangle_adjacency(tri)
    check_topology(topology, tri)
    B, H, W, _ = color.shape
    py, px = pixel_centres(H, W, pos)
    px, py = px.expand(H, W)[None].expand(B, H, W), py.expand(H, W)[None].expand(B, H, W)
    screen = pos[..., :2] / pos[..., 3:]  # (B, V, 2)
    bidx = torch.arange(B, device=pos.device)[:, None, None]
    out = color
    for dr, dc in _NEIGHBOURS:
        valid = torch.zeros((B, H, W), dtype=torch.bool, device=color.device)
        valid[:, max(0, -dr):min(H, H - dr), max(0, -dc):min(W, W - dc)] = True
        tq = _shift(tri_id, dr, dc, -1)
        dq = _shift(depth.detach(), dr, dc, 0.0)
        cq = torch.stack([_shift(color[..., ch], dr, dc, 0.0) for ch in range(color.shape[-1])], -1)
        tp, dp = tri_id, depth.detach()
        p_occ = (tq < 0) | ((tp >= 0) & ((dp < dq) | ((dp == dq) & (tp < tq))))
        T = torch.where(p_occ, tp, tq)
        qx, qy = px + 2.0 * dc / W, py + 2.0 * dr / H
        ox, oy = torch.where(p_occ, px, qx), torch.where(p_occ, py, qy)
        nx, ny = torch.where(p_occ, qx, px), torch.where(p_occ, qy, py)
        verts = tri[T.clamp_min(0)]  # (B, H, W, 3)
        v = screen[bidx[..., None], verts]  # (B, H, W, 3, 2)
        e1, e2 = v[..., 1, :] - v[..., 0, :], v[..., 2, :] - v[..., 0, :]
        area = e1[..., 0] * e2[..., 1] - e1[..., 1] * e2[..., 0]
        sgn = torch.where(area > 0, 1.0, -1.0).to(pos.dtype).detach()
        alphas = []
        for k in range(3):
            i, j = (k + 1) % 3, (k + 2) % 3
            vi, vj = v[..., i, :], v[..., j, :]

            def edge(x, y):
                return sgn * ((vj[..., 0] - vi[..., 0]) * (y - vi[..., 1]) - (vj[..., 1] - vi[..., 1]) * (x - vi[..., 0]))

            eo, en = edge(ox, oy), edge(nx, ny)
            exits = (en < 0) & (eo >= 0)
            alpha = eo / torch.where(exits, eo - en, torch.ones_like(eo))
            alphas.append(torch.where(exits, alpha, torch.full_like(alpha, 2.0)))
        alpha_all = torch.stack(alphas, -1)
        k_best = alpha_all.detach().argmin(-1)  # first minimum, as the native loop's strict <
        alpha = alpha_all.gather(-1, k_best[..., None])[..., 0]
        silhouette = _is_silhouette(screen.detach(), bidx, tri, topology, T, verts, k_best, sgn)
        w = torch.where(p_occ, 0.5 - alpha, alpha - 0.5)
        hit = valid & (tp != tq) & (area != 0) & (alpha_all.detach().min(-1).values < 2) & silhouette & (w > 0)
        w = torch.where(hit, w, torch.zeros_like(w))
        out = out + w[..., None] * (cq - color)
    return out


def _is_silhouette(screen, bidx, tri, topology, T, verts, k, sgn):
    """Whether edge k of triangle T (per pixel) is a silhouette: no neighbour across it, or the neighbour's far
    vertex o is on T's side of the edge or on it (sgn * e(o) >= 0: the neighbour faces the other way on screen)."""
    neighbour = topology[T.clamp_min(0), k]  # (B, H, W)
    nv = tri[neighbour.clamp_min(0)]  # (B, H, W, 3)
    vi = verts.gather(-1, ((k + 1) % 3)[..., None])
    vj = verts.gather(-1, ((k + 2) % 3)[..., None])
    off_edge = (nv != vi) & (nv != vj)
    far = off_edge.to(torch.int64).argmax(-1, keepdim=True)  # the (first) vertex not on the edge
    o = screen[bidx, nv.gather(-1, far)[..., 0]]
    a, b = screen[bidx, vi[..., 0]], screen[bidx, vj[..., 0]]
    e = sgn * ((b[..., 0] - a[..., 0]) * (o[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (o[..., 0] - a[..., 0]))
    return (neighbour < 0) | ~off_edge.any(-1) | (e >= 0)
