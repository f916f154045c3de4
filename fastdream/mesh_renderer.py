"""Differentiable rendering of a triangle mesh with the project's cameras and shading (the mesh stage's
counterpart of ``renderer.Renderer``).

Pipeline (threestudio's ``nvdiff_rasterizer``, on fastdream's rasterization ops): world vertices -> clip
space of every camera (``clip_positions``) -> ``ops.rasterize`` -> world position and normal per pixel
(``ops.interpolate``) -> albedo from ``color_fn`` at the covered pixels only -> DreamFusion shading
(``ops.shade``: albedo / lambertian / textureless, the camera batch's point light and ambient, as the NeRF
stage) -> composited over the background -> ``ops.antialias`` on colour and opacity together, so the
silhouette is differentiable w.r.t. the vertices (a hard coverage mask is not).

Camera conventions are those of ``cameras.generate_rays``: pixel (row j, column i) looks along
((i + 0.5 - cx) / fx, -(j + 0.5 - cy) / fy, -1) in the OpenGL camera frame, so a point projects to the pixel
whose ray goes through it, and a mesh lands on the same pixels as a radiance field of the same shape
rendered by ``Renderer.render``. In the rasterizer's NDC (row 0 at y = -1) image rows grow downwards, so
clip y is the negated OpenGL one; depth uses the usual perspective z mapping between ``near`` and ``far``.

Outputs follow ``renderer.RenderOutput``: depth is the distance from the camera (the NeRF's expected ray
distance), normal the world normal, both zero off the mesh.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .cameras import CameraBatch, generate_rays
from .errors import FastDreamError

NORMAL_MODES = ("vertex", "face")


@dataclass
class MeshRender:
    rgb: torch.Tensor      # (B, H, W, 3) shaded, composited over the background, antialiased
    opacity: torch.Tensor  # (B, H, W, 1) antialiased coverage
    normal: torch.Tensor   # (B, H, W, 3) world normal of the visible surface (unit; zero off the mesh)
    depth: torch.Tensor    # (B, H, W, 1) distance from the camera (zero off the mesh)
    tri_id: torch.Tensor   # (B, H, W) int64 visible face, -1 off the mesh


def clip_positions(verts: torch.Tensor, cameras: CameraBatch, near: float = 0.01, far: float = 100.0) -> torch.Tensor:
    """World vertices (V, 3) -> homogeneous clip coordinates (B, V, 4) of each camera, for ``ops.rasterize``."""
    c2w = cameras.c2w.to(verts.dtype)
    w2c = torch.linalg.inv(c2w)
    cam = verts[None] @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]  # (B, V, 3), OpenGL camera frame
    x, y, z = cam.unbind(-1)
    per_cam = lambda v: v.to(verts.dtype)[:, None]  # noqa: E731
    W, H = cameras.width, cameras.height
    cx, cy, fx, fy = per_cam(cameras.cx), per_cam(cameras.cy), per_cam(cameras.fx), per_cam(cameras.fy)
    # ndc_x = 2 (cx + fx x / -z) / W - 1 and ndc_y = 2 (cy - fy y / -z) / H - 1, times w = -z
    clip_x = (2 * fx / W) * x - (2 * cx / W - 1) * z
    clip_y = -(2 * fy / H) * y - (2 * cy / H - 1) * z
    clip_z = -(far + near) / (far - near) * z - 2 * far * near / (far - near)
    return torch.stack([clip_x, clip_y, clip_z, -z], -1)


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V, 3) unit normals: the area-weighted sum of the adjacent faces' right-hand normals."""
    v0, v1, v2 = (verts[faces[:, i]] for i in range(3))
    face_n = torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)  # length = twice the area
    n = torch.zeros_like(verts).index_add(0, faces.reshape(-1), face_n.repeat_interleave(3, 0))
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-20)


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(F, 3) unit right-hand normals (outward for counter-clockwise faces seen from outside)."""
    v0, v1, v2 = (verts[faces[:, i]] for i in range(3))
    return torch.nn.functional.normalize(torch.linalg.cross(v1 - v0, v2 - v0, dim=-1), dim=-1, eps=1e-20)


def _background_image(background, cameras: CameraBatch, like: torch.Tensor) -> torch.Tensor:
    B, H, W = len(cameras), cameras.height, cameras.width
    if background is None:
        return like.new_ones(B, H, W, 3)
    if callable(background) and not isinstance(background, torch.Tensor):
        _, directions = generate_rays(cameras)
        return background(directions.reshape(-1, 3).to(like.dtype)).reshape(B, H, W, 3).to(like.dtype)
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if bg.shape == (3,):
        return bg.expand(B, H, W, 3)
    if bg.shape == (B * H * W, 3):
        return bg.reshape(B, H, W, 3)
    if bg.shape == (B, H, W, 3):
        return bg
    raise FastDreamError(f"render_mesh: background must be a colour (3,), per pixel (B*H*W, 3) or (B, H, W, 3), "
                         f"or a function of the ray directions; got shape {tuple(bg.shape)} for B={B}, H={H}, W={W}.")


def render_mesh(verts: torch.Tensor, faces: torch.Tensor, cameras: CameraBatch, *,
                color_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, shading: str = "albedo",
                light: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                background: Union[None, torch.Tensor, Sequence[float], Callable] = None,
                resolution: Union[None, int, Tuple[int, int]] = None, normals: str = "vertex",
                near: float = 0.01, far: float = 100.0) -> MeshRender:
    """Render the mesh (verts (V, 3) world units, faces (F, 3) int64, counter-clockwise from outside) from
    every camera of the batch. Differentiable w.r.t. verts (through the shading, the interpolated positions
    and the antialiased silhouette) and whatever ``color_fn`` depends on.

    color_fn(points (N, 3)) -> albedo (N, 3) is called once, on the world points of the covered pixels only
    (not called for ``textureless``; required otherwise). shading: albedo | lambertian | textureless.
    light: (positions (B, 3), intensity (B,), ambient (B,)); default the camera batch's point light.
    background: None (white), a colour (3,), per-pixel colours (B*H*W, 3) or (B, H, W, 3) (e.g.
    ``Renderer.random_solid_background``), or a function of the unit ray directions (N, 3) -> (N, 3) such as
    the NeRF stage's ``BackgroundModel``. resolution: None (the cameras' own), an int (square) or (H, W):
    the cameras' intrinsics are scaled. normals: "vertex" (interpolated area-weighted vertex normals, as
    threestudio) or "face" (flat). near / far: the depth range of the z-buffer."""
    ops.shading_code(shading)
    if normals not in NORMAL_MODES:
        raise FastDreamError(f"render_mesh: normals must be one of {', '.join(NORMAL_MODES)}, got {normals!r}.")
    if shading != "textureless" and color_fn is None:
        raise FastDreamError(f"render_mesh: shading {shading!r} needs color_fn (points (N, 3) -> albedo (N, 3)).")
    if verts.dim() != 2 or verts.shape[1] != 3 or not verts.is_floating_point():
        raise FastDreamError(f"render_mesh: verts must be a float (V, 3) tensor, got {tuple(verts.shape)} {verts.dtype}.")
    if faces.dim() != 2 or faces.shape[1] != 3 or faces.dtype != torch.int64:
        raise FastDreamError(f"render_mesh: faces must be an int64 (F, 3) tensor, got {tuple(faces.shape)} {faces.dtype}.")
    if not 0 < near < far:
        raise FastDreamError(f"render_mesh: need 0 < near < far, got near={near}, far={far}.")
    if resolution is not None:
        H, W = (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
        if H < 1 or W < 1:
            raise FastDreamError(f"render_mesh: resolution must be positive, got {resolution!r}.")
        cameras = cameras.with_resolution(W, H)
    cameras = cameras.to(verts.device)
    B, H, W = len(cameras), cameras.height, cameras.width
    bg = _background_image(background, cameras, verts)
    if faces.shape[0] == 0:
        zeros = verts.new_zeros(B, H, W, 1)
        return MeshRender(rgb=bg + 0 * verts.sum(), opacity=zeros, normal=verts.new_zeros(B, H, W, 3), depth=zeros,
                          tri_id=torch.full((B, H, W), -1, dtype=torch.int64, device=verts.device))

    pos = clip_positions(verts, cameras, near, far)
    tri_id, bary, ndc_depth = ops.rasterize(pos, faces, resolution=(H, W))
    covered = tri_id >= 0
    if normals == "vertex":  # positions and normals in one pass over the image
        both = ops.interpolate(torch.cat([verts, vertex_normals(verts, faces)], -1), tri_id, bary, tri=faces)
        points_img, normal_img = both[..., :3], torch.nn.functional.normalize(both[..., 3:], dim=-1, eps=1e-20)
    else:
        points_img = ops.interpolate(verts, tri_id, bary, tri=faces)
        normal_img = face_normals(verts, faces)[tri_id.clamp_min(0)]
    zero = verts.new_zeros(())
    normal_img = torch.where(covered[..., None], normal_img, zero)

    points = points_img[covered]
    if light is None:
        light = (cameras.light_position, cameras.light_intensity, cameras.ambient)
    light_pos, intensity, ambient = (torch.as_tensor(v, dtype=verts.dtype, device=verts.device) for v in light)
    batch = covered.nonzero()[:, 0]  # the camera of every covered pixel (row-major, as boolean indexing)
    if shading == "textureless":
        albedo = torch.ones_like(points)
    else:
        albedo = color_fn(points)
        if albedo.shape != points.shape:
            raise FastDreamError(f"render_mesh: color_fn must return (N, 3) albedo for (N, 3) points, got "
                                 f"{tuple(albedo.shape)} for {tuple(points.shape)}.")
        albedo = albedo.to(verts.dtype)
    shaded = ops.shade(albedo, normal_img[covered], points, light_pos.reshape(-1, 3)[batch],
                       intensity.reshape(-1)[batch], ambient.reshape(-1)[batch], shading)
    foreground = verts.new_zeros(B, H, W, 3).masked_scatter(covered[..., None], shaded)
    rgb = torch.where(covered[..., None], foreground, bg)
    opacity = covered[..., None].to(verts.dtype)
    smooth = ops.antialias(torch.cat([rgb, opacity], -1), tri_id, ndc_depth, pos=pos, tri=faces)
    origins = cameras.c2w[:, :3, 3].to(verts.dtype)[:, None, None, :]
    depth = torch.where(covered, torch.linalg.vector_norm(points_img - origins, dim=-1), zero)[..., None]
    return MeshRender(rgb=smooth[..., :3], opacity=smooth[..., 3:], normal=normal_img, depth=depth, tri_id=tri_id)
