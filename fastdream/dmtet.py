"""DMTet geometry (Shen et al. 2021, as Magic3D's second stage uses it): a deformable tetrahedral grid with a
signed distance and an offset per vertex, turned into a triangle mesh by differentiable marching tetrahedra.

Parameters (both in ``state_dict``; the grid itself is regenerated from ``resolution`` and ``aabb``, so
checkpoints hold no index arrays):
  sdf     (V,)   signed distance at the grid vertices, < 0 inside (world units);
  deform  (V, 3) raw offsets; a vertex moves by ``deform_scale * cell * tanh(deform)``, at most
                 ``deform_scale`` of a cell per axis. threestudio bounds it by ``range / resolution * tanh``,
                 half the edge of its (quartet) grid's tetrahedra: the default 0.5 of a cube is the same bound.

``init_from_density`` places the zero level set on the radiance field's density iso-surface, the surface
the mesh export writes (``export.extract_mesh``: marching cubes at ``output.mesh_threshold``, small pieces
dropped). threestudio (``TetrahedraSDFGrid.create_from`` an implicit volume) copies the density level at the
grid vertices, ``threshold - density``, into the sdf (and shrinks the grid's box to the object; here the
caller chooses the box). Here the sdf is the signed distance to the exported marching-cubes mesh instead:
the surface lies where the export has it (the density is far from linear across a cell, so interpolating
its level would move the surface), floaters the export drops are dropped too, and the magnitudes are
distances, so the learning rate of the refinement means the same thing whatever the field's density scale. The sign comes from the density at each grid vertex, restricted to the
connected inside regions that reach the exported mesh (so pieces the export drops are dropped here too);
the magnitude is the distance to the nearest point of a dense sample of the mesh (its vertices and face
centroids, about half a marching-cubes cell apart). Vertices on the box's boundary are kept outside, as
the export pads the density, so the surface is closed.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .errors import FastDreamError
from .tets import _as_aabb, marching_tets, tet_grid


class _DensityOnBox:
    """The two things ``export.extract_mesh`` reads from a field: its box and its density."""

    def __init__(self, density_fn: Callable[[torch.Tensor], torch.Tensor], aabb: torch.Tensor):
        self.aabb, self._density_fn = aabb, density_fn

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self._density_fn(points).reshape(-1)


class DMTetGeometry(nn.Module):
    def __init__(self, resolution: int, aabb: Sequence[float] = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0),
                 deform_scale: float = 0.5):
        """A grid of ``resolution`` cubes per axis over ``aabb`` (6 tetrahedra per cube, ``tets.tet_grid``).
        Until ``init_from_density`` (or a loaded state) sets it, the sdf is a sphere at the box centre with a
        quarter of the box's smallest side as radius."""
        super().__init__()
        if not (isinstance(deform_scale, (int, float)) and 0.0 <= float(deform_scale) <= 1.0):
            raise FastDreamError(f"DMTetGeometry: deform_scale must be a number in [0, 1] (a fraction of a grid cell), "
                                 f"got {deform_scale!r}.")
        box = _as_aabb(aabb)
        vertices, tets = tet_grid(resolution, box)
        self.resolution, self.deform_scale = int(resolution), float(deform_scale)
        self.register_buffer("aabb", box, persistent=False)
        self.register_buffer("grid_vertices", vertices, persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        self.register_buffer("cell", (box[3:] - box[:3]) / self.resolution, persistent=False)
        centre, radius = (box[:3] + box[3:]) / 2, 0.25 * float((box[3:] - box[:3]).min())
        self.sdf = nn.Parameter(torch.linalg.vector_norm(vertices - centre, dim=-1) - radius)
        self.deform = nn.Parameter(torch.zeros_like(vertices))

    def deformed_vertices(self) -> torch.Tensor:
        """(V, 3) grid vertices moved by their bounded offsets."""
        return self.grid_vertices + self.deform_scale * self.cell * torch.tanh(self.deform)

    def extract(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The surface as (verts (N, 3), faces (F, 3) int64), differentiable w.r.t. sdf and deform; faces
        counter-clockwise seen from outside. Empty tensors when the sdf has no zero crossing."""
        return marching_tets(self.deformed_vertices(), self.tets, self.sdf)

    @torch.no_grad()
    def init_from_density(self, density_fn: Callable[[torch.Tensor], torch.Tensor], threshold: float, *,
                          mesh_resolution: int = 256, min_component: float = 0.05, chunk: int = 2**18) -> None:
        """Set sdf to the signed distance to the iso-surface ``density >= threshold`` of ``density_fn``
        (points (N, 3) on this module's device -> densities (N,)), as ``export.extract_mesh`` extracts it
        with the same ``mesh_resolution`` and ``min_component`` (defaults: the export's); deform is reset to
        zero. Raises FastDreamError when the density has no surface at ``threshold``. See the module
        docstring for the choices."""
        from scipy import ndimage
        from scipy.spatial import cKDTree

        from .export import extract_mesh

        device = self.sdf.device
        threshold = float(threshold)
        if not np.isfinite(threshold):
            raise FastDreamError(f"DMTetGeometry.init_from_density: threshold must be finite, got {threshold}.")
        mesh = extract_mesh(_DensityOnBox(density_fn, self.aabb.to(device)), mesh_resolution, threshold,
                            min_component, colors=False)
        if mesh is None or len(mesh.faces) == 0:
            raise FastDreamError(f"DMTetGeometry.init_from_density: the density has no surface at threshold "
                                 f"{threshold:g} inside the box {self.aabb.tolist()}, so there is nothing to refine; "
                                 f"train the radiance field further or choose another threshold.")
        points = self.grid_vertices.to(device)
        density = torch.cat([density_fn(part).reshape(-1).float() for part in points.split(chunk)]).cpu()
        samples = np.concatenate([np.asarray(mesh.vertices), np.asarray(mesh.triangles_center)])
        distance, _ = cKDTree(samples).query(points.cpu().numpy())
        distance = torch.from_numpy(distance).float()

        n = self.resolution + 1
        inside = torch.nan_to_num(density, nan=0.0) >= threshold
        boundary = torch.zeros((n, n, n), dtype=torch.bool)
        boundary[[0, -1]] = boundary[:, [0, -1]] = boundary[:, :, [0, -1]] = True
        inside &= ~boundary.reshape(-1)
        # keep the inside regions that reach the exported surface (within one cube diagonal of it)
        labels, count = ndimage.label(inside.reshape(n, n, n).numpy(), structure=np.ones((3, 3, 3)))
        labels = torch.from_numpy(labels.reshape(-1)).long()
        near = inside & (distance <= float(torch.linalg.vector_norm(self.cell)))
        keep = torch.zeros(count + 1, dtype=torch.bool)
        keep[labels[near]] = True
        keep[0] = False
        inside = keep[labels]
        if not bool(inside.any()):
            raise FastDreamError(f"DMTetGeometry.init_from_density: the surface at threshold {threshold:g} encloses no "
                                 f"vertex of the {self.resolution}^3 tetrahedral grid (the object is thinner than a "
                                 f"grid cell, {float(self.cell.max()):.3g}); use a finer grid.")
        # a vertex exactly on the surface counts as outside (marching_tets' rule); keep it strictly signed
        distance = distance.clamp_min(1e-6 * float(self.cell.min()))
        self.sdf.copy_(torch.where(inside, -distance, distance).to(self.sdf))
        self.deform.zero_()
