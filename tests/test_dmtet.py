"""Tetrahedral grid, differentiable marching tetrahedra and the DMTet geometry."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from fastdream.dmtet import DMTetGeometry
from fastdream.errors import FastDreamError
from fastdream.export import extract_mesh
from fastdream.tets import TET_EDGES, marching_tets, tet_grid


def _signed_volumes(vertices, tets):
    p = vertices[tets].double()
    return torch.linalg.det(p[:, 1:] - p[:, :1]) / 6


def _faces_of(tets):
    faces = torch.cat([tets[:, [1, 2, 3]], tets[:, [0, 2, 3]], tets[:, [0, 1, 3]], tets[:, [0, 1, 2]]])
    return torch.unique(faces.sort(-1).values, dim=0, return_counts=True)[1]


def test_tet_grid_fills_the_box_with_positive_conforming_tetrahedra():
    r, aabb = 3, (-1.0, -0.5, 0.0, 1.0, 0.5, 3.0)
    vertices, tets = tet_grid(r, aabb)
    assert vertices.shape == ((r + 1) ** 3, 3) and vertices.dtype == torch.float32
    assert tets.shape == (6 * r ** 3, 4) and tets.dtype == torch.int64
    assert torch.allclose(vertices.min(0).values, torch.tensor(aabb[:3])) and torch.allclose(vertices.max(0).values, torch.tensor(aabb[3:]))
    vol = _signed_volumes(vertices, tets)
    assert bool((vol > 0).all())
    assert math.isclose(float(vol.sum()), 2.0 * 1.0 * 3.0, rel_tol=1e-5)  # no gaps, no overlaps
    # conforming: every face is shared by two tetrahedra except the two triangles per boundary square
    counts = _faces_of(tets)
    assert set(counts.tolist()) == {1, 2}
    assert int((counts == 1).sum()) == 6 * r * r * 2


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_tet_grid_refuses_a_bad_resolution(bad):
    with pytest.raises(FastDreamError, match="resolution"):
        tet_grid(bad)


def test_tet_grid_refuses_a_bad_box():
    with pytest.raises(FastDreamError, match="aabb"):
        tet_grid(2, (0, 0, 0, 1, -1, 1))


@pytest.fixture(scope="module")
def sphere_mesh():
    radius, r = 0.6, 24
    vertices, tets = tet_grid(r)
    sdf = torch.linalg.vector_norm(vertices, dim=-1) - radius
    verts, faces = marching_tets(vertices, tets, sdf)
    return radius, 2.0 / r, verts, faces


def test_marching_tets_on_a_sphere_gives_a_closed_outward_mesh_on_the_sphere(sphere_mesh):
    radius, cell, verts, faces = sphere_mesh
    mesh = trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert len(mesh.vertices) - len(mesh.edges_unique) + len(mesh.faces) == 2  # a sphere's Euler characteristic
    # every vertex is an edge crossing of the sdf: on the sphere up to the linear interpolation error
    assert float((torch.linalg.vector_norm(verts, dim=-1) - radius).abs().max()) < 0.1 * cell
    assert math.isclose(mesh.volume, 4 / 3 * math.pi * radius ** 3, rel_tol=0.015)
    # counter-clockwise from outside: every face normal points away from the centre
    v = verts[faces]
    normal = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)
    assert bool(((normal * v.mean(1)).sum(-1) > 0).all())


def test_every_case_of_the_table_winds_from_the_inside_to_the_outside():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        vertices = torch.randn(4, 3, generator=g, dtype=torch.float64)
        if _signed_volumes(vertices, torch.tensor([[0, 1, 2, 3]])) < 0:
            vertices = vertices[[0, 2, 1, 3]]
        magnitude = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
        for code in range(1, 15):
            inside = torch.tensor([(code >> i) & 1 for i in range(4)], dtype=torch.bool)
            sdf = torch.where(inside, -magnitude, magnitude)
            verts, faces = marching_tets(vertices, torch.tensor([[0, 1, 2, 3]]), sdf)
            n_in = int(inside.sum())
            assert faces.shape[0] == (2 if n_in == 2 else 1) and verts.shape[0] == (4 if n_in == 2 else 3)
            direction = vertices[~inside].mean(0) - vertices[inside].mean(0)
            v = verts[faces]
            normal = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)
            assert bool(((normal @ direction) > 0).all()), (trial, code)


def test_marching_tets_crossings_are_where_the_interpolated_sdf_vanishes():
    vertices, tets = tet_grid(2)
    sdf = vertices[:, 0] - 0.25 + 0.1 * vertices[:, 1]  # a plane: linear, so crossings are exact
    verts, faces = marching_tets(vertices, tets, sdf)
    assert verts.shape[0] > 0
    assert float((verts[:, 0] - 0.25 + 0.1 * verts[:, 1]).abs().max()) < 1e-6
    assert torch.unique(verts, dim=0).shape[0] == verts.shape[0]  # each crossing once


def test_marching_tets_without_a_sign_change_is_empty():
    vertices, tets = tet_grid(2)
    verts, faces = marching_tets(vertices, tets, torch.ones(vertices.shape[0]))
    assert verts.shape == (0, 3) and faces.shape == (0, 3) and faces.dtype == torch.int64


def test_marching_tets_gradcheck_sdf_and_vertices():
    vertices, tets = tet_grid(2)
    g = torch.Generator().manual_seed(1)
    vertices = (vertices.double() + 0.1 * torch.randn(vertices.shape, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(vertices.shape[0], generator=g) < 0.5, -1.0, 1.0).double()
    sdf = sign * (0.2 + torch.rand(vertices.shape[0], generator=g, dtype=torch.float64))
    assert marching_tets(vertices, tets, sdf)[1].shape[0] > 4
    vertices.requires_grad_(True)
    sdf.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, s: marching_tets(v, tets, s)[0], (vertices, sdf))


def test_marching_tets_refuses_bad_inputs():
    vertices, tets = tet_grid(1)
    with pytest.raises(FastDreamError, match="sdf"):
        marching_tets(vertices, tets, torch.zeros(3))
    with pytest.raises(FastDreamError, match="tets"):
        marching_tets(vertices, tets.int(), torch.zeros(vertices.shape[0]))
    with pytest.raises(FastDreamError, match="outside"):
        marching_tets(vertices, tets + 100, torch.zeros(vertices.shape[0]))


# ------------------------------------------------------------------------------------------ DMTet

def _blob_density(points):
    """A lumpy body (a ball and an ellipsoid merged) and a small floater that the export drops."""
    body = torch.maximum(0.55 - torch.linalg.vector_norm(points - torch.tensor([0.1, 0.0, 0.0]), dim=-1),
                         0.35 - torch.linalg.vector_norm((points - torch.tensor([-0.35, 0.3, 0.0])) / torch.tensor([1.0, 0.6, 0.8]), dim=-1))
    floater = 0.1 - torch.linalg.vector_norm(points - torch.tensor([-0.7, -0.7, 0.7]), dim=-1)
    return 400.0 * torch.maximum(body, floater).clamp_min(0) ** 0.5  # not linear: the level 10 is 6e-4 inside


class _Field:
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])

    def density(self, x):
        return _blob_density(x)


def _surface_distance(a: trimesh.Trimesh, b: trimesh.Trimesh, n=4000, dense=200_000):
    """Distances from points sampled on a to the surface b, and from b's samples to a (the surface stood for by a
    dense sample of it, about 0.005 apart here: that much bias on the distances)."""
    from scipy.spatial import cKDTree

    def one_way(x, y, seed):
        points, _ = trimesh.sample.sample_surface(x, n, seed=seed)
        return cKDTree(trimesh.sample.sample_surface(y, dense, seed=seed + 2)[0]).query(points)[0]

    return one_way(a, b, 0), one_way(b, a, 1)


def test_dmtet_initialised_from_a_density_reproduces_the_exported_mesh():
    r = 24
    cell = 2.0 / r
    geometry = DMTetGeometry(r)
    geometry.init_from_density(_blob_density, 10.0, mesh_resolution=96)
    verts, faces = geometry.extract()
    refined = trimesh.Trimesh(verts.detach().numpy(), faces.numpy(), process=False)
    exported = extract_mesh(_Field(), resolution=96, threshold=10.0, colors=False)
    assert refined.is_watertight and refined.volume > 0
    # the floater that the export drops is not in the DMTet surface either
    assert float(torch.linalg.vector_norm(verts.detach() - torch.tensor([-0.7, -0.7, 0.7]), dim=-1).min()) > 0.3
    d_ab, d_ba = _surface_distance(refined, exported)
    assert d_ab.mean() < 0.1 * cell and d_ba.mean() < 0.1 * cell, (d_ab.mean(), d_ba.mean())
    assert max(d_ab.max(), d_ba.max()) < 0.5 * cell
    assert math.isclose(refined.volume, exported.volume, rel_tol=0.025)


def test_dmtet_sdf_is_a_signed_distance():
    geometry = DMTetGeometry(16)
    radius = 0.5
    geometry.init_from_density(lambda p: 100.0 * (radius - torch.linalg.vector_norm(p, dim=-1)), 0.0,
                               mesh_resolution=128)
    truth = torch.linalg.vector_norm(geometry.grid_vertices, dim=-1) - radius
    interior = (geometry.grid_vertices.abs() < 0.999).all(-1)  # the box's boundary layer is kept outside
    assert float((geometry.sdf.detach() - truth)[interior].abs().max()) < 0.01
    assert bool((geometry.sdf.detach()[~interior] > 0).all())
    assert float(geometry.deform.detach().abs().max()) == 0.0


def test_dmtet_without_a_surface_at_the_threshold_is_refused():
    geometry = DMTetGeometry(4)
    before = geometry.sdf.detach().clone()
    with pytest.raises(FastDreamError, match="no surface"):
        geometry.init_from_density(lambda p: torch.zeros(p.shape[0]), 10.0, mesh_resolution=16)
    assert torch.equal(geometry.sdf.detach(), before)  # nothing half-set


def test_dmtet_refuses_a_surface_thinner_than_its_grid():
    geometry = DMTetGeometry(3)  # vertices at -1, -1/3, 1/3, 1: a ball of radius 0.2 holds none
    with pytest.raises(FastDreamError, match="finer grid"):
        geometry.init_from_density(lambda p: 100.0 * (0.2 - torch.linalg.vector_norm(p, dim=-1)), 0.0,
                                   mesh_resolution=64)


def test_dmtet_extract_is_differentiable_and_the_deformation_bounded():
    geometry = DMTetGeometry(8, aabb=(-1, -1, -1, 1, 1, 1), deform_scale=0.5)
    verts, faces = geometry.extract()
    assert faces.shape[0] > 0
    (verts ** 2).sum().backward()
    assert geometry.sdf.grad.abs().sum() > 0 and geometry.deform.grad.abs().sum() > 0
    with torch.no_grad():
        geometry.deform.fill_(100.0)
    moved = geometry.deformed_vertices() - geometry.grid_vertices
    assert float(moved.abs().max()) <= 0.5 * 2.0 / 8 + 1e-6


def test_dmtet_state_dict_round_trip_holds_only_the_parameters():
    a = DMTetGeometry(6)
    with torch.no_grad():
        a.sdf.add_(0.05 * torch.randn_like(a.sdf))
        a.deform.normal_()
    state = a.state_dict()
    assert set(state) == {"sdf", "deform"}
    b = DMTetGeometry(6)
    b.load_state_dict(state)
    va, fa = a.extract()
    vb, fb = b.extract()
    assert torch.equal(fa, fb) and torch.equal(va, vb)
    with pytest.raises(RuntimeError):
        DMTetGeometry(5).load_state_dict(state)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_dmtet_refuses_a_bad_deform_scale(bad):
    with pytest.raises(FastDreamError, match="deform_scale"):
        DMTetGeometry(2, deform_scale=bad)


def test_tet_edges_are_the_six_pairs():
    assert sorted(TET_EDGES) == [(a, b) for a in range(4) for b in range(a + 1, 4)]
