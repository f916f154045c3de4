"""Outputs of a trained field: mesh (OBJ+MTL, PLY, GLB), turntable videos and preview grids.

Mesh: the density is sampled on a (resolution)^3 lattice spanning the field's box (padded by one
layer below the threshold so surfaces touching the box close up), PyMCubes extracts the iso-surface
at ``threshold``, connected pieces with fewer than ``min_component`` x the largest piece's faces are
dropped, and each vertex gets the field's albedo there. Coordinates are world units in the y-up world
(the convention of glTF and OBJ); with reference guidance, the reference scene's coordinates.

Videos: a 360 degree orbit, one in colour (albedo) and one textureless (white, lit by a light
following the camera). MP4 through imageio-ffmpeg; a GIF when ffmpeg is unavailable.

Everything here takes a `Renderer` (or its field) so evaluation code can reuse it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .cameras import orbit_cameras

log = logging.getLogger("fastdream")


# ---------------------------------------------------------------------------------------------- mesh

@torch.no_grad()
def density_grid(field, resolution: int = 256, chunk: int = 2**18) -> np.ndarray:
    """Density at the (resolution)^3 lattice points linspace(aabb_min, aabb_max), indexed [x, y, z]."""
    aabb = field.aabb.detach().float().cpu()
    device = field.aabb.device
    axes = [torch.linspace(float(aabb[i]), float(aabb[i + 3]), resolution) for i in range(3)]
    out = np.empty((resolution,) * 3, dtype=np.float32)
    flat = out.reshape(resolution, -1)
    yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), -1).reshape(-1, 3 - 1)
    per_slab = max(1, chunk // yz.shape[0])
    for start in range(0, resolution, per_slab):
        xs = axes[0][start:start + per_slab]
        pts = torch.cat([xs[:, None, None].expand(-1, yz.shape[0], 1), yz[None].expand(xs.shape[0], -1, -1)], -1).reshape(-1, 3)
        sigma = field.density(pts.to(device)).float().cpu()
        flat[start:start + xs.shape[0]] = torch.nan_to_num(sigma, nan=0.0, posinf=1e6).reshape(xs.shape[0], -1).numpy()
    return out


@torch.no_grad()
def query_albedo(field, points: np.ndarray, chunk: int = 2**16) -> np.ndarray:
    device = field.aabb.device
    parts = []
    for start in range(0, len(points), chunk):
        pts = torch.as_tensor(points[start:start + chunk], dtype=torch.float32, device=device)
        _, albedo, _ = field.query(pts, need_normals=False)
        parts.append(albedo.float().clamp(0, 1).cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.float32)


def extract_mesh(field, resolution: int = 256, threshold: float = 10.0, min_component: float = 0.05,
                 colors: bool = True):
    """Marching cubes on the field's density -> trimesh.Trimesh (world units, vertex colours), or None if empty."""
    import mcubes
    import trimesh

    sigma = density_grid(field, resolution)
    lo = min(float(sigma.min()), threshold) - 1.0
    padded = np.pad(sigma, 1, mode="constant", constant_values=lo)
    vertices, faces = mcubes.marching_cubes(padded, float(threshold))
    if len(faces) == 0:
        log.warning("fastdream: no surface at density threshold %g (density range %.3g .. %.3g); the mesh is empty. "
                    "Re-export with another --threshold.", threshold, float(sigma.min()), float(sigma.max()))
        return None
    aabb = field.aabb.detach().float().cpu().numpy()
    vertices = aabb[:3] + (vertices - 1.0) / (resolution - 1) * (aabb[3:] - aabb[:3])
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces.astype(np.int64), process=True)
    if min_component > 0 and len(mesh.faces):
        parts = mesh.split(only_watertight=False)
        if len(parts) > 1:
            sizes = np.array([len(p.faces) for p in parts])
            keep = [p for p, n in zip(parts, sizes) if n >= min_component * sizes.max()]
            mesh = trimesh.util.concatenate(keep)
    if mesh.is_volume and mesh.volume < 0:
        mesh.invert()
    elif not mesh.is_volume:
        # orient by the signed volume even when not watertight
        if mesh.volume < 0:
            mesh.invert()
    if colors:
        albedo = query_albedo(field, np.asarray(mesh.vertices))
        rgba = np.concatenate([albedo, np.ones((len(albedo), 1), np.float32)], 1)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=(rgba * 255).round().astype(np.uint8))
    return mesh


def _write_obj(mesh, path: Path, texture: Optional[dict] = None) -> List[Path]:
    """OBJ with per-vertex colours (`v x y z r g b`, read by Blender and trimesh) and an MTL."""
    mtl = path.with_suffix(".mtl")
    lines = [f"# fastdream mesh: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces, world units, y-up",
             f"mtllib {mtl.name}"]
    if texture is not None:
        # only with a texture: a `usemtl` makes trimesh drop the per-vertex colours of untextured meshes
        lines.append("usemtl material0")
    v = np.asarray(mesh.vertices)
    cols = None
    if getattr(mesh.visual, "kind", None) == "vertex":
        cols = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
    if cols is not None:
        lines += [f"v {a:.6f} {b:.6f} {c:.6f} {r:.4f} {g:.4f} {bl:.4f}" for (a, b, c), (r, g, bl) in zip(v, cols)]
    else:
        lines += [f"v {a:.6f} {b:.6f} {c:.6f}" for a, b, c in v]
    lines += [f"vn {a:.5f} {b:.5f} {c:.5f}" for a, b, c in np.asarray(mesh.vertex_normals)]
    f = np.asarray(mesh.faces) + 1
    if texture is not None:
        lines += [f"vt {a:.6f} {b:.6f}" for a, b in texture["uv"]]
        tf = np.asarray(texture["faces"]) + 1
        lines += [f"f {a}/{ta}/{a} {b}/{tb}/{b} {c}/{tc}/{c}" for (a, b, c), (ta, tb, tc) in zip(f, tf)]
    else:
        lines += [f"f {a}//{a} {b}//{b} {c}//{c}" for a, b, c in f]
    path.write_text("\n".join(lines) + "\n")
    mtl_lines = ["# fastdream material", "newmtl material0", "Ka 0.000 0.000 0.000", "Kd 1.000 1.000 1.000",
                 "Ks 0.000 0.000 0.000", "d 1.0", "illum 1"]
    if texture is not None:
        mtl_lines.append(f"map_Kd {texture['image'].name}")
    mtl.write_text("\n".join(mtl_lines) + "\n")
    return [path, mtl]


def bake_texture(field, mesh, folder: Path, size: int = 1024, name: str = "mesh") -> Optional[dict]:
    """UV-unwrap with xatlas (if installed) and bake the field's albedo into a texture; None when unavailable."""
    try:
        import xatlas
    except ImportError:
        log.warning("fastdream: xatlas is not installed (pip install xatlas); skipping the UV texture.")
        return None
    import imageio.v2 as imageio

    v = np.asarray(mesh.vertices, dtype=np.float32)
    f = np.asarray(mesh.faces, dtype=np.uint32)
    vmap, tfaces, uv = xatlas.parametrize(v, f)
    # rasterise every chart triangle in texel space; texel centres -> barycentrics -> 3D points -> albedo
    pix = uv * (size - 1)
    tri = pix[tfaces]  # (F,3,2)
    pos = v[vmap][tfaces]  # (F,3,3)
    image = np.zeros((size, size, 3), np.float32)
    filled = np.zeros((size, size), bool)
    pts_all, idx_all = [], []
    for k in range(len(tfaces)):
        a, b, c = tri[k]
        x0, y0 = np.floor(np.minimum(np.minimum(a, b), c)).astype(int)
        x1, y1 = np.ceil(np.maximum(np.maximum(a, b), c)).astype(int)
        xs, ys = np.meshgrid(np.arange(max(x0, 0), min(x1, size - 1) + 1), np.arange(max(y0, 0), min(y1, size - 1) + 1))
        p = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
        den = (b[1] - c[1]) * (a[0] - c[0]) + (c[0] - b[0]) * (a[1] - c[1])
        if abs(den) < 1e-12:
            continue
        w0 = ((b[1] - c[1]) * (p[:, 0] - c[0]) + (c[0] - b[0]) * (p[:, 1] - c[1])) / den
        w1 = ((c[1] - a[1]) * (p[:, 0] - c[0]) + (a[0] - c[0]) * (p[:, 1] - c[1])) / den
        w2 = 1 - w0 - w1
        inside = (w0 >= -0.05) & (w1 >= -0.05) & (w2 >= -0.05)
        if not inside.any():
            continue
        w = np.stack([w0, w1, w2], 1)[inside]
        pts_all.append(w @ pos[k])
        idx_all.append(p[inside].astype(int))
    if pts_all:
        pts = np.concatenate(pts_all)
        idx = np.concatenate(idx_all)
        image[idx[:, 1], idx[:, 0]] = query_albedo(field, pts)
        filled[idx[:, 1], idx[:, 0]] = True
    image_path = folder / f"{name}_albedo.png"
    imageio.imwrite(image_path, (np.flipud(image) * 255).round().astype(np.uint8))
    return {"uv": uv, "faces": tfaces, "vmap": vmap, "image": image_path}


def write_mesh(mesh, folder, name: str = "mesh", texture: Optional[dict] = None) -> Dict[str, Path]:
    """mesh.obj (+ .mtl), mesh.ply and mesh.glb in folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    obj_paths = _write_obj(mesh, folder / f"{name}.obj", texture)
    paths["obj"], paths["mtl"] = obj_paths
    paths["ply"] = folder / f"{name}.ply"
    mesh.export(paths["ply"])
    paths["glb"] = folder / f"{name}.glb"
    mesh.export(paths["glb"])
    if texture is not None:
        paths["texture"] = texture["image"]
    return paths


# ---------------------------------------------------------------------------------------------- images

def view_distance(radius: float, output_config=None, camera_config=None) -> float:
    if output_config is not None and getattr(output_config, "view_distance", 0) > 0:
        return float(output_config.view_distance) * radius
    return 2.2 * radius


@torch.no_grad()
def render_views(renderer, cameras, shading: str = "albedo") -> np.ndarray:
    """(B,H,W,3) uint8 renders; cameras are moved to the renderer's device."""
    device = renderer.field.aabb.device
    was_training = renderer.training
    renderer.eval()
    try:
        out = renderer.render(cameras.to(device), shading=shading)
    finally:
        renderer.train(was_training)
    return (out.rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def orbit(renderer, n_views: int, resolution: int, elevation: float = 15.0, distance: Optional[float] = None,
          fov: float = 45.0, start_azimuth: float = 0.0):
    radius = float((renderer.field.aabb[3:] - renderer.field.aabb[:3]).max()) / 2
    distance = 2.2 * radius if distance is None else distance
    return orbit_cameras(n_views, resolution, resolution, elevation_deg=elevation, distance=distance, fov_y_deg=fov,
                         start_azimuth_deg=start_azimuth)


def render_turntable(renderer, n_frames: int = 120, resolution: int = 256, shading: str = "albedo",
                     elevation: float = 15.0, distance: Optional[float] = None, fov: float = 45.0,
                     batch: int = 8) -> np.ndarray:
    """(n_frames, H, W, 3) uint8 frames of a 360 degree orbit."""
    cams = orbit(renderer, n_frames, resolution, elevation, distance, fov)
    frames = [render_views(renderer, cams[i:i + batch], shading)
              for i in range(0, n_frames, batch)]
    return np.concatenate(frames)


def write_video(frames: np.ndarray, path, fps: int = 30) -> Path:
    """MP4 (H.264 via imageio-ffmpeg); falls back to a GIF next to it when ffmpeg is unavailable."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import imageio_ffmpeg  # noqa: F401

        h, w = frames.shape[1:3]
        if h % 2 or w % 2:  # yuv420p needs even sizes
            frames = frames[:, : h - h % 2, : w - w % 2]
        writer = imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                    macro_block_size=1, pixelformat="yuv420p", ffmpeg_log_level="error")
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        return path
    except (ImportError, RuntimeError, OSError) as exc:
        gif = path.with_suffix(".gif")
        log.warning("fastdream: could not write %s with ffmpeg (%s); writing %s instead.", path.name, exc, gif.name)
        imageio.mimsave(gif, list(frames), duration=1000.0 / fps, loop=0)
        return gif


def image_grid(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of (N,H,W,3) images -> one (rows*H, N*W, 3) image."""
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


def write_preview(renderer, path, n_views: int = 4, resolution: int = 128, elevation: float = 15.0,
                  distance: Optional[float] = None, fov: float = 45.0) -> Path:
    """A grid of views: colour on top, textureless below."""
    import imageio.v2 as imageio

    cams = orbit(renderer, n_views, resolution, elevation, distance, fov, start_azimuth=0.0)
    grid = image_grid([render_views(renderer, cams, "albedo"), render_views(renderer, cams, "textureless")])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    imageio.imwrite(tmp, grid)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- everything

def export_outputs(renderer, folder, output_config, log_fn=None) -> Dict[str, str]:
    """Mesh files and turntables into folder, following an OutputConfig; returns {kind: path}."""
    folder = Path(folder)
    o = output_config
    say = log_fn or log.info
    written: Dict[str, str] = {}
    distance = view_distance(float((renderer.field.aabb[3:] - renderer.field.aabb[:3]).max()) / 2, o)
    if o.mesh:
        say(f"extracting the mesh (marching cubes at {o.mesh_resolution}^3, threshold {o.mesh_threshold:g})")
        mesh = extract_mesh(renderer.field, o.mesh_resolution, o.mesh_threshold, o.mesh_min_component)
        if mesh is not None:
            texture = bake_texture(renderer.field, mesh, folder, o.texture_resolution) if o.texture else None
            written.update({k: str(p) for k, p in write_mesh(mesh, folder, "mesh", texture).items()})
            say(f"mesh: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces -> {folder / 'mesh.obj'}, .ply, .glb")
    if o.video:
        say(f"rendering turntables ({o.video_frames} frames at {o.video_resolution}x{o.video_resolution})")
        for shading, name in (("albedo", "turntable.mp4"), ("textureless", "turntable_textureless.mp4")):
            frames = render_turntable(renderer, o.video_frames, o.video_resolution, shading, o.video_elevation,
                                      distance, o.view_fov)
            written[f"video_{shading}"] = str(write_video(frames, folder / name, o.video_fps))
    return written


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(torch.mean((a.float() - b.float()) ** 2))
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)
