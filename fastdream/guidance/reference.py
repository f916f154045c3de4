"""Reference-scene guidance: SDS with an exact denoiser for a known 3D scene.

``--guidance reference --reference-scene SCENE`` replaces the diffusion model by a scene whose
renders are the "clean images": for each training camera and shading mode the scene is rendered with
the same `Renderer` the field is trained with (a voxel field sampled trilinearly, a fixed background),
giving x0. The SDS machinery of `Guidance` then runs unchanged: t and eps are drawn, the render x
is noised to x_t = sqrt(ab) x + sqrt(1-ab) eps, and the "model" predicts the noise that takes x_t back
to x0, eps_hat = (x_t - sqrt(ab) x0) / sqrt(1-ab). The SDS gradient w(t) (eps_hat - eps) therefore
equals w(t) sqrt(ab) / sqrt(1-ab) (x - x0): a randomly weighted photometric loss against the scene,
delivered through the same noise sampling, weighting, surrogate loss, optimiser and occupancy grid as
text-to-3D. A run that recovers the scene checks the whole loop end to end, without model weights.
For image-to-3D runs (``--image``, a render of the scene from the input camera) the same scene is the exact
novel-view denoiser: each camera's clean image is the scene seen from that camera, whose pose relative to
the input view is its pose in the scene's frame (the input camera sits at azimuth 0).

The model input z is the render in [-1, 1] (pixel space, like DeepFloyd IF), at the render resolution.

Scenes: an .npz with ``density`` (X,Y,Z) >= 0, ``albedo`` (X,Y,Z,3) in [0,1] and ``aabb`` (6,)
(voxels indexed [x, y, z], centres at aabb_min + (i + 0.5) / D * size, as `fastdream.demo` writes), or
a mesh (.obj/.ply/.glb/.stl/.off) voxelised with trimesh at ``resolution`` voxels per axis inside a cube
around its bounds, coloured from its vertex colours (or texture/material colour) when it has them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..demo import sample_volume, voxel_volume
from ..errors import FastDreamError
from .base import Guidance, GuidanceOptions, SDSOutput
from .registry import GuidanceFamily, register

log = logging.getLogger("fastdream")

MESH_SUFFIXES = (".obj", ".ply", ".glb", ".gltf", ".stl", ".off")


# ---------------------------------------------------------------------------------------------- scenes

def load_reference_scene(path, resolution: int = 64) -> Dict[str, np.ndarray]:
    """{"density" (X,Y,Z), "albedo" (X,Y,Z,3), "aabb" (6,)} from an .npz scene or a mesh file."""
    path = Path(path)
    if not path.exists():
        raise FastDreamError(f"Reference scene {path} does not exist; pass an .npz voxel scene "
                             "(density, albedo, aabb) or a mesh (.obj/.ply/.glb).")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path)
    if suffix in MESH_SUFFIXES:
        return voxelize_mesh(path, resolution)
    raise FastDreamError(f"Reference scene {path}: unknown file type {suffix!r}; use an .npz voxel scene or a "
                         f"mesh ({', '.join(MESH_SUFFIXES)}).")


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            scene = {k: np.asarray(data[k], dtype=np.float32) for k in ("density", "albedo", "aabb")}
    except KeyError as exc:
        raise FastDreamError(f"Reference scene {path} lacks the array {exc}; it needs density (X,Y,Z), "
                             "albedo (X,Y,Z,3) and aabb (6,).") from None
    except Exception as exc:
        raise FastDreamError(f"Reference scene {path} could not be read as an .npz ({type(exc).__name__}: {exc}).") from None
    return check_scene(scene, str(path))


def check_scene(scene: Dict[str, np.ndarray], name: str = "scene") -> Dict[str, np.ndarray]:
    d, a, box = (np.asarray(scene[k], dtype=np.float32) for k in ("density", "albedo", "aabb"))
    if d.ndim != 3 or a.shape != d.shape + (3,) or box.reshape(-1).shape != (6,):
        raise FastDreamError(f"Reference scene {name} has density {d.shape}, albedo {a.shape}, aabb {box.shape}; "
                             "expected (X,Y,Z), (X,Y,Z,3) and (6,).")
    box = box.reshape(6)
    if not np.all(box[3:] > box[:3]):
        raise FastDreamError(f"Reference scene {name}: aabb {box.tolist()} must be (xmin, ymin, zmin, xmax, ymax, zmax) with max > min.")
    if not (np.isfinite(d).all() and np.isfinite(a).all()):
        raise FastDreamError(f"Reference scene {name} holds non-finite values.")
    return {"density": np.clip(d, 0, None), "albedo": np.clip(a, 0, 1), "aabb": box}


def mesh_occupancy(mesh, points: np.ndarray, pitch: float) -> np.ndarray:
    """Whether each of `points` (N, 3) lies inside the closed trimesh `mesh`: a solid voxelisation at `pitch`,
    then a lookup (no rtree/embree needed)."""
    vox = mesh.voxelized(pitch=pitch).fill()
    idx = vox.points_to_indices(points)
    shape = np.asarray(vox.matrix.shape)
    valid = np.all((idx >= 0) & (idx < shape), axis=1)
    inside = np.zeros(len(points), dtype=bool)
    inside[valid] = vox.matrix[idx[valid, 0], idx[valid, 1], idx[valid, 2]]
    return inside


def voxelize_mesh(path, resolution: int = 64, padding: float = 0.1) -> Dict[str, np.ndarray]:
    """Solid voxelisation of a mesh inside a cube around its bounds (a `padding` fraction larger)."""
    import trimesh

    try:
        mesh = trimesh.load(str(path), force="mesh")
    except Exception as exc:
        raise FastDreamError(f"Reference mesh {path} could not be loaded by trimesh ({type(exc).__name__}: {exc}).") from None
    if mesh is None or len(getattr(mesh, "faces", [])) == 0:
        raise FastDreamError(f"Reference mesh {path} holds no triangles.")
    D = int(resolution)
    lo, hi = mesh.bounds
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2 * (1 + padding)
    aabb = np.concatenate([centre - half, centre + half]).astype(np.float32)
    pitch = 2 * half / D
    coords = [aabb[i] + (np.arange(D) + 0.5) * pitch for i in range(3)]
    points = np.stack(np.meshgrid(*coords, indexing="ij"), axis=-1).reshape(-1, 3)
    occupancy = mesh_occupancy(mesh, points, pitch).reshape(D, D, D).astype(np.float32)
    # soften by one voxel so trilinear sampling and finite-difference normals see a smooth surface
    t = torch.from_numpy(occupancy)[None, None]
    occupancy = F.avg_pool3d(t, 3, stride=1, padding=1, count_include_pad=False)[0, 0].numpy()
    density = occupancy * (4.0 / pitch)  # ~ 1 - e^-4 opacity per voxel at the core
    albedo = np.full((D, D, D, 3), 0.7, dtype=np.float32)
    colors = None
    try:
        visual = mesh.visual.to_color() if mesh.visual.kind == "texture" else mesh.visual
        if getattr(visual, "kind", None) == "vertex":
            colors = np.asarray(visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0
        elif getattr(visual, "kind", None) == "face":
            colors = np.asarray(visual.face_colors, dtype=np.float32)[:, :3] / 255.0
    except Exception:
        colors = None
    if colors is not None and len(colors):
        from scipy.spatial import cKDTree

        anchors = mesh.vertices if len(colors) == len(mesh.vertices) else mesh.triangles_center
        _, nearest = cKDTree(np.asarray(anchors)).query(points)
        albedo = colors[nearest].reshape(D, D, D, 3).astype(np.float32)
    return check_scene({"density": density.astype(np.float32), "albedo": albedo, "aabb": aabb}, str(path))


class VoxelField(nn.Module):
    """A fixed voxel scene with the field interface the renderer uses (density / query / aabb)."""

    def __init__(self, density, albedo, aabb, normal_epsilon_voxels: float = 0.5):
        super().__init__()
        density = torch.as_tensor(np.asarray(density), dtype=torch.float32)
        albedo = torch.as_tensor(np.asarray(albedo), dtype=torch.float32)
        self.register_buffer("aabb", torch.as_tensor(np.asarray(aabb), dtype=torch.float32).reshape(6))
        self.register_buffer("volume", voxel_volume(density, albedo).contiguous())  # (1, 4, Z, Y, X)
        self.resolution = tuple(density.shape)
        voxel = float(((self.aabb[3:] - self.aabb[:3]) / torch.tensor(self.resolution)).min())
        self.normal_epsilon = normal_epsilon_voxels * voxel
        size = self.aabb[3:] - self.aabb[:3]  # host copies: read every render, they must not sync
        self._scene_radius = float(size.max()) / 2
        self.diagonal = float(torch.linalg.vector_norm(size))

    @property
    def scene_radius(self) -> float:
        return self._scene_radius

    @property
    def centre(self) -> torch.Tensor:
        return (self.aabb[:3] + self.aabb[3:]) / 2

    def _sample(self, x: torch.Tensor, channels: slice) -> torch.Tensor:
        return sample_volume(self.volume[:, channels], self.aabb, x)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self._sample(x, slice(0, 1))[:, 0].clamp_min(0.0).to(x.dtype)

    def query(self, x: torch.Tensor, need_normals: bool = False):
        out = self._sample(x, slice(0, 4))
        sigma, albedo = out[:, 0].clamp_min(0.0), out[:, 1:].clamp(0.0, 1.0)
        normals = None
        if need_normals:
            eps = self.normal_epsilon
            offsets = torch.eye(3, device=x.device, dtype=x.dtype) * eps
            probes = torch.cat([x[:, None, :] + offsets, x[:, None, :] - offsets], dim=1).reshape(-1, 3)
            sig = self.density(probes).reshape(-1, 2, 3)
            normals = F.normalize(-(sig[:, 0] - sig[:, 1]) / (2 * eps), dim=-1, eps=1e-12)
        return sigma.to(x.dtype), albedo.to(x.dtype), normals

    def occupancy(self, grid_resolution: int, threshold: float = 1e-3) -> torch.Tensor:
        """(R,R,R) bool: grid cells that can hold density (voxels dilated by trilinear support)."""
        occ = (self.volume[:, :1] > threshold).float()  # (1,1,Z,Y,X)
        occ = F.max_pool3d(occ, 3, stride=1, padding=1)
        cells = F.adaptive_max_pool3d(occ, grid_resolution)[0, 0] > 0  # (Z,Y,X)
        return cells.permute(2, 1, 0).contiguous()


def build_reference_renderer(scene: Dict[str, np.ndarray], render_config=None, grid_resolution: int = 64,
                             background_color=(1.0, 1.0, 1.0), device="cpu"):
    """A Renderer over the voxel scene: same marching, compositing and shading as training, fixed background."""
    from ..field import BackgroundModel
    from ..occupancy import OccupancyGrid
    from ..renderer import Renderer

    field = VoxelField(scene["density"], scene["albedo"], scene["aabb"])
    grid = OccupancyGrid(field.aabb, resolution=grid_resolution)
    grid.binary.copy_(field.occupancy(grid_resolution))
    renderer = Renderer(field, BackgroundModel("fixed", background_color), grid, render_config)
    return renderer.to(device).eval()


def ddpm_alphas_cumprod(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The linear DDPM schedule of pixel-space models (DeepFloyd IF uses a cosine one; either works here)."""
    betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float()


class ReferenceSceneGuidance(Guidance):
    """`Guidance` whose noise prediction is the exact denoiser of a reference scene's renders."""

    def __init__(self, scene, device="cpu", options: Optional[GuidanceOptions] = None, render_config=None,
                 grid_resolution: int = 64, background_color=(1.0, 1.0, 1.0), resolution: int = 64):
        if isinstance(scene, (str, Path)):
            scene = load_reference_scene(scene, resolution)
        self.scene = check_scene(scene)
        options = options or GuidanceOptions(view_dependent=False)
        super().__init__(options=options, device=torch.device(device), dtype=torch.float32,
                         alphas_cumprod=ddpm_alphas_cumprod())
        self.renderer = build_reference_renderer(self.scene, render_config, grid_resolution, background_color, self.device)
        self.resolution = None  # renders are used at their own size
        self._x0: Optional[torch.Tensor] = None

    @property
    def aabb(self) -> Tuple[float, ...]:
        return tuple(float(v) for v in self.scene["aabb"])

    def set_condition(self, condition) -> None:
        """The scene is the condition: a prompt, an input image (a render of the scene) and its pose are accepted
        and not needed, so text-to-3D and image-to-3D runs both check against the scene."""
        self.set_prompt(condition.prompt or "the reference scene")

    # --------------------------------------------------------------- Guidance hooks
    def _encode_text(self, texts: List[str]) -> torch.Tensor:
        return torch.zeros(len(texts), 1, 1, device=self.device)  # the scene is the "prompt"

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * 2.0 - 1.0

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        if self._x0 is None:
            raise FastDreamError("ReferenceSceneGuidance.predict_noise needs the reference renders: call the guidance "
                                 "with images and cameras.")
        x0 = self._x0.repeat(z_t.shape[0] // self._x0.shape[0], 1, 1, 1)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (z_t.float() - ab.sqrt() * x0) / (1.0 - ab).sqrt()

    # --------------------------------------------------------------- API
    @torch.no_grad()
    def reference_images(self, cameras, shading: str = "albedo") -> torch.Tensor:
        """The scene rendered for cameras, (B,3,H,W) in [0,1]."""
        out = self.renderer.render(cameras.to(self.device), shading=shading)
        return out.rgb.permute(0, 3, 1, 2).contiguous()

    def __call__(self, images: torch.Tensor, cameras: Any, shading: str = "albedo", progress: float = 0.0,
                 *, t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                 opacity: Optional[torch.Tensor] = None) -> SDSOutput:
        if cameras is None:
            raise FastDreamError("Reference-scene guidance needs the cameras of the renders.")
        ref = self.reference_images(cameras, shading)
        if ref.shape != images.shape:
            raise FastDreamError(f"Reference renders {tuple(ref.shape)} do not match the images {tuple(images.shape)}.")
        self._x0 = ref * 2.0 - 1.0
        try:
            return super().__call__(images, cameras, shading, progress, t=t, noise=noise, opacity=opacity)
        finally:
            self._x0 = None

    def describe(self) -> dict:
        d = super().describe()
        d.update(scene_resolution=list(self.scene["density"].shape), aabb=list(self.aabb))
        return d


def _create_reference(source, *, device, dtype, options, reference_scene="", reference_resolution: int = 64,
                      render_config=None, grid_resolution: int = 64, background_color=(1.0, 1.0, 1.0)):
    return ReferenceSceneGuidance(reference_scene, device, options=options, render_config=render_config,
                                  grid_resolution=grid_resolution, background_color=background_color,
                                  resolution=reference_resolution)


def _configure_run(config) -> None:
    """The field lives in the scene's box and sees the scene's fixed background."""
    scene = load_reference_scene(config.guidance.reference_scene, config.guidance.reference_resolution)
    config.aabb = tuple(float(v) for v in scene["aabb"])
    if config.background != "fixed":
        log.info("fastdream: reference guidance renders the scene over a fixed background; using background=fixed.")
        config.background = "fixed"


register(GuidanceFamily(
    name="reference", description="the exact denoiser of a known scene (no model weights)", needs_model=False,
    conditioning=("text", "image", "pose"),
    create=_create_reference, option_defaults={"view_dependent": False}, configure_run=_configure_run))
