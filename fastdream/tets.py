"""Tetrahedral grids and differentiable marching tetrahedra (the geometry of DMTet).

``tet_grid`` builds a regular lattice of ``resolution`` cubes per axis over a box and splits every cube
into the 6 tetrahedra of Kuhn's (Freudenthal's) triangulation: one tetrahedron per order in which a path
from the cube's lowest corner to its highest one steps along x, y and z. Every cube is split the same way,
so neighbouring cubes cut their shared square along the same diagonal and the grid is conforming (two
tetrahedra meet in a whole face, an edge, a vertex or not at all). Magic3D and threestudio load a grid
precomputed by quartet (``load/tets/128_tets.npz``, from nvdiffrec/Kaolin); this one is generated in code
instead, so nothing is downloaded or shipped. Sizes: threestudio's "128" grid has roughly as many vertices
as ``tet_grid(64)`` (65^3 = 275k vertices, 1.57M tetrahedra): its tetrahedra are about 2 / 128 of the box
across, and so are these cubes.

``marching_tets`` extracts the zero level set of a signed distance sampled at the grid vertices
(sdf < 0 inside, > 0 outside; a vertex at exactly 0 counts as outside). The surface crosses every tet
edge whose end points have different signs, at the point where the linear interpolation of the sdf is
zero, ``p = p_a + s_a / (s_a - s_b) (p_b - p_a)``, which is differentiable w.r.t. the vertex positions
and the sdf (DMTet, Shen et al. 2021, eq. 2). Each crossing edge gives one mesh vertex, shared by every
tetrahedron around the edge, so a closed level set gives a watertight mesh. Faces are wound
counter-clockwise seen from outside (right-hand normals point from the inside to the outside). The
per-case triangle table is derived in code from a reference tetrahedron rather than written out as in
threestudio's ``MarchingTetrahedraHelper`` (whose convention for the inside is the opposite sign).
"""
from __future__ import annotations

import itertools
from typing import Sequence, Tuple

import numpy as np
import torch

from .errors import FastDreamError

# the six edges of a tetrahedron, as pairs of its local vertex indices
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _as_aabb(aabb) -> torch.Tensor:
    box = torch.as_tensor(aabb, dtype=torch.float32).detach().cpu().reshape(-1)
    if box.shape != (6,) or not bool(torch.isfinite(box).all()) or not bool((box[3:] > box[:3]).all()):
        raise FastDreamError(f"tet_grid: aabb must be six finite numbers (xmin, ymin, zmin, xmax, ymax, zmax) with "
                             f"max > min on every axis, got {box.tolist()}.")
    return box


def _kuhn_tets() -> np.ndarray:
    """(6, 4) corner indices (bit 0: +x, bit 1: +y, bit 2: +z) of the positively oriented Kuhn tetrahedra."""
    out = []
    for order in itertools.permutations(range(3)):
        corner, path = 0, [0]
        for axis in order:
            corner |= 1 << axis
            path.append(corner)
        p = np.array([[(c >> a) & 1 for a in range(3)] for c in path], dtype=np.float64)
        if np.linalg.det(p[1:] - p[0]) < 0:
            path[1], path[2] = path[2], path[1]
        out.append(path)
    return np.array(out, dtype=np.int64)


def tet_grid(resolution: int, aabb: Sequence[float] = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)):
    """A conforming tetrahedral grid of ``resolution`` cubes per axis over ``aabb`` (six numbers).

    Returns (vertices (V, 3) float32, V = (resolution + 1)^3, the lattice linspace(min, max, resolution + 1)
    per axis with vertex index (i * (r + 1) + j) * (r + 1) + k for the point (x_i, y_j, z_k); tets (T, 4)
    int64, T = 6 resolution^3, every one with a positive signed volume det(v1 - v0, v2 - v0, v3 - v0))."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise FastDreamError(f"tet_grid: resolution must be a positive integer (cubes per axis), got {resolution!r}.")
    r = int(resolution)
    box = _as_aabb(aabb)
    axes = [torch.linspace(float(box[a]), float(box[a + 3]), r + 1) for a in range(3)]
    vertices = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    n = r + 1
    cube = torch.arange(r)
    i, j, k = (g.reshape(-1) for g in torch.meshgrid(cube, cube, cube, indexing="ij"))
    base = (i * n + j) * n + k  # lowest corner of every cube
    corner_offset = torch.tensor([((c & 1) * n + ((c >> 1) & 1)) * n + ((c >> 2) & 1) for c in range(8)])
    local = torch.from_numpy(_kuhn_tets())  # (6, 4) corners
    tets = (base[:, None, None] + corner_offset[local][None]).reshape(-1, 4)
    return vertices, tets


def _triangle_table():
    """(16, 2, 3) local edge indices of the triangles of each inside-code (bit i: vertex i inside; -1 pads)
    and (16,) triangle counts, wound so that the normal points from the inside vertices to the outside ones
    on a positively oriented tetrahedron (orientation is affine-invariant and does not change while the
    crossing points move inside their edges, so one reference tetrahedron decides it)."""
    ref = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    table = -np.ones((16, 2, 3), dtype=np.int64)
    counts = np.zeros(16, dtype=np.int64)
    for code in range(16):
        inside = [(code >> v) & 1 for v in range(4)]
        crossing = [e for e, (a, b) in enumerate(TET_EDGES) if inside[a] != inside[b]]
        if not crossing:
            continue
        if len(crossing) == 3:
            tris = [crossing]
        else:  # two inside (a, b), two outside (c, d): the quad ac, ad, bd, bc
            a, b = [v for v in range(4) if inside[v]]
            c, d = [v for v in range(4) if not inside[v]]
            e = {frozenset(TET_EDGES[x]): x for x in range(6)}
            ac, ad, bd, bc = (e[frozenset(p)] for p in ((a, c), (a, d), (b, d), (b, c)))
            tris = [[ac, ad, bd], [ac, bd, bc]]
        inner = ref[[v for v in range(4) if inside[v]]].mean(0)
        outer = ref[[v for v in range(4) if not inside[v]]].mean(0)
        for t, tri in enumerate(tris):
            p = np.array([ref[list(TET_EDGES[x])].mean(0) for x in tri])
            normal = np.cross(p[1] - p[0], p[2] - p[0])
            if normal @ (outer - inner) < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[code, t] = tri
        counts[code] = len(tris)
    return torch.from_numpy(table), torch.from_numpy(counts)


_TRIANGLES, _TRIANGLE_COUNTS = _triangle_table()


def _check_inputs(vertices: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor) -> None:
    if vertices.dim() != 2 or vertices.shape[1] != 3 or not vertices.is_floating_point():
        raise FastDreamError(f"marching_tets: vertices must be a float (V, 3) tensor, got {tuple(vertices.shape)} "
                             f"{vertices.dtype}.")
    if tets.dim() != 2 or tets.shape[1] != 4 or tets.dtype != torch.int64:
        raise FastDreamError(f"marching_tets: tets must be an int64 (T, 4) tensor, got {tuple(tets.shape)} {tets.dtype}.")
    if sdf.shape != (vertices.shape[0],) or not sdf.is_floating_point():
        raise FastDreamError(f"marching_tets: sdf must be a float (V,) tensor with one value per vertex "
                             f"(V = {vertices.shape[0]}), got {tuple(sdf.shape)} {sdf.dtype}.")
    if tets.numel() and (int(tets.min()) < 0 or int(tets.max()) >= vertices.shape[0]):
        raise FastDreamError(f"marching_tets: tets hold vertex indices outside [0, {vertices.shape[0]}).")


def marching_tets(vertices: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The zero level set of ``sdf`` (V,) on the tetrahedral mesh (vertices (V, 3), tets (T, 4) int64,
    positively oriented) as a triangle mesh: (verts (N, 3), differentiable w.r.t. vertices and sdf; faces
    (F, 3) int64, counter-clockwise seen from outside). sdf < 0 is inside. Empty tensors when the sdf does
    not change sign. See the module docstring."""
    _check_inputs(vertices, tets, sdf)
    device, V = vertices.device, vertices.shape[0]
    with torch.no_grad():
        inside = sdf.detach() < 0
        weights = torch.tensor([1, 2, 4, 8], device=device)
        code = (inside[tets].long() * weights).sum(-1)
        surface = (code > 0) & (code < 15)
        cut_tets, cut_code = tets[surface], code[surface]
        local = torch.tensor(TET_EDGES, device=device)
        ends = cut_tets[:, local]  # (Ts, 6, 2)
        lo, hi = torch.minimum(ends[..., 0], ends[..., 1]), torch.maximum(ends[..., 0], ends[..., 1])
        crossing = inside[lo] != inside[hi]
        keys, edge_vertex = torch.unique(lo[crossing] * V + hi[crossing], return_inverse=True)
        edge_of = torch.full(lo.shape, -1, dtype=torch.int64, device=device)
        edge_of[crossing] = edge_vertex
        a, b = keys // V, keys % V
        table, counts = _TRIANGLES.to(device)[cut_code], _TRIANGLE_COUNTS.to(device)[cut_code]  # (Ts, 2, 3), (Ts,)
        present = torch.arange(2, device=device)[None, :] < counts[:, None]  # (Ts, 2)
        faces = torch.gather(edge_of[:, None, :].expand(-1, 2, -1), 2, table.clamp_min(0))[present]
    s_a, s_b = sdf[a], sdf[b]
    t = (s_a / (s_a - s_b))[:, None].to(vertices.dtype)
    verts = torch.lerp(vertices[a], vertices[b], t)  # exactly p_b at t = 1 (an end point with sdf 0)
    return verts, faces
