"""Outputs of a trained field: mesh (OBJ+MTL, PLY, GLB), turntable videos and preview grids.

Mesh: the density is sampled on a (resolution)^3 lattice spanning the field's box (padded by one
layer below the threshold so surfaces touching the box close up), PyMCubes extracts the iso-surface
at ``threshold``, connected pieces with fewer than ``min_component`` x the largest piece's faces are
dropped, and each vertex gets the field's albedo there. Coordinates are world units in the y-up world
(the convention of glTF and OBJ); with reference guidance, the reference scene's coordinates.

Videos: a 360 degree orbit, one in colour (albedo) and one textureless (white, lit by a light
following the camera). MP4 through imageio-ffmpeg; a GIF when ffmpeg is unavailable.

Every file is written atomically (fastdream.atomic): an interrupted export or a full disk leaves the
earlier outputs whole; the four mesh files are replaced together.

Everything here takes a `Renderer` (or its field) so evaluation code can reuse it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from . import atomic
from .cameras import orbit_cameras
from .progress import progress

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
    with progress(resolution, "density grid", unit="slice") as bar:
        for start in range(0, resolution, per_slab):
            xs = axes[0][start:start + per_slab]
            pts = torch.cat([xs[:, None, None].expand(-1, yz.shape[0], 1), yz[None].expand(xs.shape[0], -1, -1)], -1).reshape(-1, 3)
            sigma = field.density(pts.to(device)).float().cpu()
            flat[start:start + xs.shape[0]] = torch.nan_to_num(sigma, nan=0.0, posinf=1e6).reshape(xs.shape[0], -1).numpy()
            bar.update(xs.shape[0])
    return out


@torch.no_grad()
def query_albedo(field, points: np.ndarray, chunk: int = 2**16, desc: str = "vertex colours") -> np.ndarray:
    device = field.aabb.device
    parts = []
    with progress(len(points), desc, unit="point") as bar:
        for start in range(0, len(points), chunk):
            pts = torch.as_tensor(points[start:start + chunk], dtype=torch.float32, device=device)
            _, albedo, _ = field.query(pts, need_normals=False)
            parts.append(albedo.float().clamp(0, 1).cpu().numpy())
            bar.update(len(pts))
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


def _write_obj(mesh, path: Path, mtl_name: str, texture: Optional[dict] = None) -> None:
    """OBJ with per-vertex colours (`v x y z r g b`, read by Blender and trimesh), pointing at the MTL mtl_name."""
    lines = [f"# fastdream mesh: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces, world units, y-up",
             f"mtllib {mtl_name}"]
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


def _write_mtl(path: Path, texture: Optional[dict] = None) -> None:
    mtl_lines = ["# fastdream material", "newmtl material0", "Ka 0.000 0.000 0.000", "Kd 1.000 1.000 1.000",
                 "Ks 0.000 0.000 0.000", "d 1.0", "illum 1"]
    if texture is not None:
        mtl_lines.append(f"map_Kd {texture['image'].name}")
    path.write_text("\n".join(mtl_lines) + "\n")


def rasterize_uv(triangles: np.ndarray, size: int, margin: float = 0.5, chunk: int = 2**22):
    """Texels covered by 2D triangles (F, 3, 2) given in texel units (texel centres at integers).

    Every triangle's bounding box is enumerated at once (no per-face loop); a texel is kept when its
    centre lies inside the triangle grown by `margin` texels (within margin of each edge line and of the
    bounding box; the barycentrics then extrapolate slightly), so the texels that bilinear sampling
    reads along a chart's border are baked too.
    Returns (face index (N,), texel xy (N, 2) int, barycentrics (N, 3)).
    """
    triangles = triangles.astype(np.float64)
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    den = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    # altitude of vertex i over the opposite edge: barycentric i times it is the distance to that edge
    altitude = np.abs(den)[:, None] / np.maximum(np.stack(
        [np.linalg.norm(b - c, axis=1), np.linalg.norm(c - a, axis=1), np.linalg.norm(a - b, axis=1)], 1), 1e-12)
    lo = np.maximum(np.ceil(triangles.min(axis=1) - margin).astype(np.int64), 0)
    hi = np.minimum(np.floor(triangles.max(axis=1) + margin).astype(np.int64), size - 1)
    extent = hi - lo + 1
    faces = np.flatnonzero((np.abs(den) >= 1e-12) & (extent > 0).all(axis=1))
    area = extent[faces, 0] * extent[faces, 1]
    out_faces, out_texels, out_bary = [], [], []
    # Chunks of faces bound the candidate texels held at once.
    cumulative = np.cumsum(area)
    splits = np.searchsorted(cumulative, np.arange(chunk, cumulative[-1] if len(faces) else 0, chunk))
    for index in np.split(np.arange(len(faces)), splits):
        if len(index) == 0:
            continue
        part, counts = faces[index], area[index]
        face = np.repeat(part, counts)
        local = np.arange(len(face)) - np.repeat(np.cumsum(counts) - counts, counts)
        width = extent[face, 0]
        x = lo[face, 0] + local % width
        y = lo[face, 1] + local // width
        ax, ay = a[face, 0], a[face, 1]
        bx, by = b[face, 0], b[face, 1]
        cx, cy = c[face, 0], c[face, 1]
        w0 = ((by - cy) * (x - cx) + (cx - bx) * (y - cy)) / den[face]
        w1 = ((cy - ay) * (x - cx) + (ax - cx) * (y - cy)) / den[face]
        w2 = 1.0 - w0 - w1
        h = altitude[face]
        keep = (w0 * h[:, 0] >= -margin) & (w1 * h[:, 1] >= -margin) & (w2 * h[:, 2] >= -margin)
        out_faces.append(face[keep])
        out_texels.append(np.stack([x[keep], y[keep]], 1))
        out_bary.append(np.stack([w0[keep], w1[keep], w2[keep]], 1).astype(np.float32))
    if not out_faces:
        return np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros((0, 3), np.float32)
    return np.concatenate(out_faces), np.concatenate(out_texels), np.concatenate(out_bary)


def dilate_texture(image: np.ndarray, filled: np.ndarray, iterations: int = 8) -> np.ndarray:
    """Grow the baked charts into the empty texels around them (mean of filled 4-neighbours), so
    bilinear filtering and mipmaps near a seam do not pull in the black background."""
    image, filled = image.copy(), filled.copy()
    neighbours = lambda a: a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:]  # noqa: E731  (of a 1-padded array)
    for _ in range(iterations):
        total = neighbours(np.pad(image * filled[..., None], ((1, 1), (1, 1), (0, 0))))
        count = neighbours(np.pad(filled.astype(np.float32), 1))
        grow = ~filled & (count > 0)
        if not grow.any():
            break
        image[grow] = total[grow] / count[grow][:, None]
        filled |= grow
    return image


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
    atlas = xatlas.Atlas()
    atlas.add_mesh(v, f)
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding = size, 2  # charts at least 2 texels apart: room for the dilation below
    atlas.generate(pack_options=pack)
    vmap, tfaces, uv = atlas[0]
    # uv (0,0) is the corner of the texture, texel (i, j) is centred at ((i + .5) / size, (j + .5) / size)
    face_ids, texels, bary = rasterize_uv(uv[tfaces] * size - 0.5, size)
    image = np.zeros((size, size, 3), np.float32)
    filled = np.zeros((size, size), bool)
    if len(face_ids):
        points = np.einsum("nk,nkc->nc", bary, v[vmap][tfaces][face_ids])
        image[texels[:, 1], texels[:, 0]] = query_albedo(field, points, desc="texture bake")
        filled[texels[:, 1], texels[:, 0]] = True
    image = dilate_texture(image, filled)
    image_path = folder / f"{name}_albedo.png"
    with atomic.temporary_path(image_path) as tmp:
        imageio.imwrite(tmp, (np.flipud(image) * 255).round().astype(np.uint8))
    return {"uv": uv, "faces": tfaces, "vmap": vmap, "image": image_path}


def write_mesh(mesh, folder, name: str = "mesh", texture: Optional[dict] = None) -> Dict[str, Path]:
    """mesh.obj (+ .mtl), mesh.ply and mesh.glb in folder."""
    folder = Path(folder)
    paths = {kind: folder / f"{name}.{kind}" for kind in ("obj", "mtl", "ply", "glb")}
    # written as a set: the files replace the earlier ones only once all of them are complete
    with atomic.temporary_paths(paths) as tmp:
        _write_obj(mesh, tmp["obj"], paths["mtl"].name, texture)
        _write_mtl(tmp["mtl"], texture)
        mesh.export(tmp["ply"], file_type="ply")
        (mesh if texture is None else _textured_mesh(mesh, texture)).export(tmp["glb"], file_type="glb")
    paths = dict(paths)
    if texture is not None:
        paths["texture"] = texture["image"]
    return paths


def _textured_mesh(mesh, texture: dict):
    """The mesh split along the UV seams (xatlas's vertex map) with the baked image as its glTF
    base-colour texture, so the GLB carries the texture as the OBJ does."""
    import trimesh
    from PIL import Image

    vmap = np.asarray(texture["vmap"])
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.open(texture["image"]),
                                                   metallicFactor=0.0, roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=np.asarray(texture["uv"]), material=material)
    return trimesh.Trimesh(vertices=np.asarray(mesh.vertices)[vmap], faces=np.asarray(texture["faces"]),
                           vertex_normals=np.asarray(mesh.vertex_normals)[vmap], visual=visual, process=False)


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
    frames = []
    with progress(n_frames, f"turntable ({shading})", unit="frame") as bar:
        for i in range(0, n_frames, batch):
            frames.append(render_views(renderer, cams[i:i + batch], shading))
            bar.update(len(frames[-1]))
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
        with atomic.temporary_path(path) as tmp:
            writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
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
        with atomic.temporary_path(gif) as tmp:
            imageio.mimsave(tmp, list(frames), duration=1000.0 / fps, loop=0)
        return gif


def image_grid(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of (N,H,W,3) images -> one (rows*H, N*W, 3) image."""
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


def photo_tile(photo: torch.Tensor, size: int) -> np.ndarray:
    """(size, size, 3) uint8 of an input photo (3, H, W) in [0, 1], to show beside renders."""
    import torch.nn.functional as F

    tile = F.interpolate(photo[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (tile[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def write_preview(renderer, path, n_views: int = 4, resolution: int = 128, elevation: float = 15.0,
                  distance: Optional[float] = None, fov: float = 45.0, input_view=None) -> Path:
    """A grid of views: colour on top, textureless below. `input_view` (photo (3,H,W), its camera) of an
    image-to-3D run adds a first column: the photo above the reconstruction seen from the photo's camera."""
    import imageio.v2 as imageio

    cams = orbit(renderer, n_views, resolution, elevation, distance, fov, start_azimuth=0.0)
    rows = [render_views(renderer, cams, "albedo"), render_views(renderer, cams, "textureless")]
    if input_view is not None:
        photo, camera = input_view
        seen = render_views(renderer, camera.with_resolution(resolution, resolution), "albedo")
        rows = [np.concatenate([photo_tile(photo, resolution)[None], rows[0]]), np.concatenate([seen, rows[1]])]
    grid = image_grid(rows)
    path = Path(path)
    with atomic.temporary_path(path) as tmp:
        imageio.imwrite(tmp, grid)
    return path


# ---------------------------------------------------------------------------------------------- everything

def export_outputs(renderer, folder, output_config, log_fn=None, input_photo: Optional[torch.Tensor] = None) -> Dict[str, str]:
    """Mesh files and turntables into folder, following an OutputConfig; returns {kind: path}. An image-to-3D
    run's `input_photo` (3, H, W) is shown at the left of every turntable frame."""
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
            if input_photo is not None:
                tile = photo_tile(input_photo, o.video_resolution)
                frames = np.concatenate([np.broadcast_to(tile, frames.shape), frames], axis=2)
            written[f"video_{shading}"] = str(write_video(frames, folder / name, o.video_fps))
    return written


def psnr_from_mse(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] with mean squared error `mse`."""
    return float("inf") if mse <= 0 else -10.0 * math.log10(mse)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return psnr_from_mse(float(torch.mean((a.float() - b.float()) ** 2)))
