"""Posed images in the NeRF-synthetic / instant-ngp format.

A dataset folder holds transforms_train.json + transforms_test.json (NeRF-synthetic; trains on train,
evaluates on test) or a single transforms.json (instant-ngp; every 8th frame is held out for
evaluation). Each file has either camera_angle_x (+ optional camera_angle_y) or fl_x / fl_y / cx / cy
(+ optional w / h, the image size these intrinsics refer to), any of which a frame may override;
frames[].file_path (relative to the json, extension optional) and frames[].transform_matrix, a 4x4
(or 3x4) camera-to-world matrix in the OpenGL convention (camera looks down -z, y up). RGBA images
are composited over the background colour; images can be downscaled to a given width. Lens distortion
given as instant-ngp writes it (k1, k2, k3, p1, p2: OpenCV's model, at the top level or per frame) is
removed when the images load, so everything downstream sees pinhole images; fisheye lenses (k4,
is_fisheye) are not modelled and are warned about.

The scene box is, in order of preference: an explicit "aabb": [[xmin,ymin,zmin],[xmax,ymax,zmax]]
(a fastdream extension other tools ignore), else instant-ngp's aabb_scale: a cube of half-size
1.5 * aabb_scale around the origin (instant-ngp maps the unit cube to NeRF-synthetic's [-1.5, 1.5]^3),
else [-1.5, 1.5]^3. With aabb_scale the box's central cube (half-size 1.5, where instant-ngp expects
the object) is kept as `centre_aabb`: the occupancy grid takes its threshold's mean there.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .cameras import CameraBatch, cameras_from_poses
from .errors import FastDreamError

log = logging.getLogger("fastdream")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG", ".exr", ".webp", ".bmp", ".tif", ".tiff")
HOLDOUT_EVERY = 8
DEFAULT_HALF_SIZE = 1.5
_DISTORTION_KEYS = ("k1", "k2", "k3", "p1", "p2")  # OpenCV's radial and tangential model, as instant-ngp writes it
_UNSUPPORTED_LENS_KEYS = ("k4", "is_fisheye")
_INTRINSIC_KEYS = ("camera_angle_x", "camera_angle_y", "fl_x", "fl_y", "cx", "cy", "w", "h") + _DISTORTION_KEYS + _UNSUPPORTED_LENS_KEYS


@dataclass
class PosedImages:
    """One split of a posed-image dataset."""

    images: torch.Tensor      # (N, H, W, 3) float32 in [0, 1], composited over the background
    c2w: torch.Tensor         # (N, 4, 4) float32, OpenGL camera-to-world
    fx: torch.Tensor          # (N,) intrinsics in pixels of the loaded (possibly downscaled) images
    fy: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    width: int
    height: int
    aabb: torch.Tensor        # (6,) scene box
    paths: List[Path]         # the image files, in frame order
    source: Path              # the transforms file they came from
    centre_aabb: Optional[torch.Tensor] = None  # (6,) the object's region inside an aabb_scale box; None: all of aabb
    alphas: Optional[torch.Tensor] = None       # (N, H, W) the images' alpha in [0, 1]; None: all opaque

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def central_box(self) -> torch.Tensor:
        """(6,) the object's region: centre_aabb, or the whole aabb when the capture gives none."""
        return self.aabb if self.centre_aabb is None else self.centre_aabb

    @property
    def intrinsics(self) -> torch.Tensor:
        """(N, 4): fx, fy, cx, cy per image."""
        return torch.stack([self.fx, self.fy, self.cx, self.cy], dim=-1)

    @property
    def cameras(self) -> CameraBatch:
        return cameras_from_poses(self.c2w, self.fx, self.fy, self.cx, self.cy, self.width, self.height)

    def subset(self, indices: Sequence[int]) -> "PosedImages":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return PosedImages(self.images[idx], self.c2w[idx], self.fx[idx], self.fy[idx], self.cx[idx], self.cy[idx],
                           self.width, self.height, self.aabb, [self.paths[i] for i in idx.tolist()], self.source,
                           self.centre_aabb, None if self.alphas is None else self.alphas[idx])


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FastDreamError(f"{path} does not exist.") from None
    except json.JSONDecodeError as exc:
        raise FastDreamError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FastDreamError(f"{path} could not be read ({type(exc).__name__}: {exc}).") from None
    if not isinstance(meta, dict):
        raise FastDreamError(f"{path} must hold a JSON object with a \"frames\" list, found a {type(meta).__name__}.")
    frames = meta.get("frames")
    if not isinstance(frames, list):
        raise FastDreamError(f"{path} has no \"frames\" list; a transforms file lists its images under \"frames\".")
    if not frames:
        raise FastDreamError(f"{path} has an empty \"frames\" list: there are no images to fit.")
    return meta


def _number(value, what: str, source: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FastDreamError(f"{source}: {what} must be a finite number, got {value!r}.")
    return float(value)


def _resolve_image(base: Path, file_path, index: int, source: Path) -> Path:
    if not isinstance(file_path, str) or not file_path:
        raise FastDreamError(f"{source}: frame {index} has no \"file_path\" string.")
    path = (base / file_path)
    if path.is_file():
        return path
    if not path.suffix or path.suffix not in IMAGE_EXTENSIONS:
        for ext in IMAGE_EXTENSIONS:
            candidate = path.with_name(path.name + ext)
            if candidate.is_file():
                return candidate
    raise FastDreamError(f"{source}: frame {index} names the image {file_path!r}, but {path} does not exist "
                         "(tried with and without an image extension).")


def _read_image(path: Path, background: torch.Tensor) -> torch.Tensor:
    """(H, W, 4) float32 in [0, 1]: the colour composited over background, then the alpha (1 without one)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(im, dtype=np.float64) / 65535.0
            elif im.mode == "F":
                array = np.asarray(im, dtype=np.float32)
            else:
                has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
                array = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise FastDreamError(f"Image {path} could not be read ({type(exc).__name__}: {exc}).") from None
    image = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise FastDreamError(f"Image {path} has shape {array.shape}; expected (H, W), (H, W, 3) or (H, W, 4).")
    channels = image.shape[-1]
    if channels in (1, 2):  # grey (+ alpha)
        image = np.concatenate([np.repeat(image[..., :1], 3, axis=-1), image[..., 1:]], axis=-1)
    t = torch.from_numpy(np.ascontiguousarray(image))
    if t.shape[-1] == 4:
        alpha = t[..., 3:4].clamp(0.0, 1.0)
        t = t[..., :3] * alpha + background * (1.0 - alpha)
    else:
        alpha = torch.ones_like(t[..., :1])
    return torch.cat([t.clamp(0.0, 1.0), alpha], dim=-1)


def _frame_matrix(frame: Dict[str, Any], index: int, source: Path) -> torch.Tensor:
    if "transform_matrix" not in frame:
        raise FastDreamError(f"{source}: frame {index} has no \"transform_matrix\".")
    try:
        m = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except (TypeError, ValueError):
        raise FastDreamError(f"{source}: frame {index} has a transform_matrix that is not a 4x4 array of numbers.") from None
    if m.shape == (3, 4):
        m = np.concatenate([m, [[0.0, 0.0, 0.0, 1.0]]], axis=0)
    if m.shape != (4, 4):
        raise FastDreamError(f"{source}: frame {index} has a transform_matrix of shape {m.shape}; expected 4x4 (or 3x4).")
    if not np.isfinite(m).all():
        raise FastDreamError(f"{source}: frame {index} has a transform_matrix with non-finite values.")
    det = np.linalg.det(m[:3, :3])
    if abs(det) < 1e-8:
        raise FastDreamError(f"{source}: frame {index} has a singular rotation in its transform_matrix (determinant {det:.3g}).")
    return torch.from_numpy(m).float()


def _intrinsics(meta: Dict[str, Any], image_w: int, image_h: int, index: int, source: Path) -> Tuple[float, float, float, float]:
    """fx, fy, cx, cy in pixels of the image as stored on disk."""
    num = lambda key: _number(meta[key], f"{key} (frame {index})", source)  # noqa: E731
    ref_w = num("w") if "w" in meta else float(image_w)
    ref_h = num("h") if "h" in meta else float(image_h)
    if ref_w <= 0 or ref_h <= 0:
        raise FastDreamError(f"{source}: w and h must be positive, got {ref_w} x {ref_h}.")
    if "fl_x" in meta or "fl_y" in meta:
        fx = num("fl_x") if "fl_x" in meta else num("fl_y")
        fy = num("fl_y") if "fl_y" in meta else fx
    elif "camera_angle_x" in meta or "camera_angle_y" in meta:
        for key in ("camera_angle_x", "camera_angle_y"):
            if key in meta and not 0.0 < num(key) < math.pi:
                raise FastDreamError(f"{source}: {key} must be a field of view in radians in (0, pi), got {meta[key]!r}.")
        fx = 0.5 * ref_w / math.tan(0.5 * num("camera_angle_x")) if "camera_angle_x" in meta else None
        fy = 0.5 * ref_h / math.tan(0.5 * num("camera_angle_y")) if "camera_angle_y" in meta else None
        fx, fy = (fx if fx is not None else fy), (fy if fy is not None else fx)
    else:
        raise FastDreamError(f"{source}: no camera intrinsics for frame {index}; give camera_angle_x, or fl_x/fl_y "
                             "(+ cx/cy), at the top level or per frame.")
    if fx <= 0 or fy <= 0:
        raise FastDreamError(f"{source}: focal lengths must be positive, got fl_x={fx}, fl_y={fy}.")
    cx = num("cx") if "cx" in meta else ref_w / 2
    cy = num("cy") if "cy" in meta else ref_h / 2
    sx, sy = image_w / ref_w, image_h / ref_h  # intrinsics given for another image size
    return fx * sx, fy * sy, cx * sx, cy * sy


def undistort_image(image: torch.Tensor, fx: float, fy: float, cx: float, cy: float, k1: float = 0.0,
                    k2: float = 0.0, k3: float = 0.0, p1: float = 0.0, p2: float = 0.0) -> torch.Tensor:
    """(H, W, C) image through a lens with OpenCV's radial (k1, k2, k3) and tangential (p1, p2) distortion ->
    the image a pinhole camera with the same fx, fy, cx, cy sees. Each output pixel centre is pushed through
    the distortion model (explicit in this direction) and the input is sampled there, bilinearly."""
    h, w = image.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    u, v = (xs - cx) / fx, (ys - cy) / fy
    r2 = u * u + v * v
    radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    ud = u * radial + 2.0 * p1 * u * v + p2 * (r2 + 2.0 * u * u)
    vd = v * radial + p1 * (r2 + 2.0 * v * v) + 2.0 * p2 * u * v
    grid = torch.stack([(ud * fx + cx) / w * 2.0 - 1.0, (vd * fy + cy) / h * 2.0 - 1.0], dim=-1).float()
    out = F.grid_sample(image.permute(2, 0, 1)[None], grid[None], mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0].permute(1, 2, 0).contiguous()


def scene_aabb(meta: Dict[str, Any], source: Path) -> torch.Tensor:
    if "aabb" in meta:
        try:
            box = np.asarray(meta["aabb"], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            box = np.zeros(0)
        if box.shape != (6,) or not np.isfinite(box).all() or not (box[3:] > box[:3]).all():
            raise FastDreamError(f"{source}: \"aabb\" must be [[xmin, ymin, zmin], [xmax, ymax, zmax]] with max > min, got {meta['aabb']!r}.")
        return torch.from_numpy(box).float()
    half = DEFAULT_HALF_SIZE
    if "aabb_scale" in meta:  # instant-ngp: the unit cube (here [-1.5, 1.5]^3) scaled about its centre
        scale = _number(meta["aabb_scale"], "aabb_scale", source)
        if scale <= 0:
            raise FastDreamError(f"{source}: aabb_scale must be positive, got {scale}.")
        half *= scale
    return torch.tensor([-half] * 3 + [half] * 3, dtype=torch.float32)


def centre_aabb(meta: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The unscaled central cube of an aabb_scale box (None without aabb_scale, or with an explicit aabb)."""
    if "aabb" in meta or "aabb_scale" not in meta:
        return None
    return torch.tensor([-DEFAULT_HALF_SIZE] * 3 + [DEFAULT_HALF_SIZE] * 3, dtype=torch.float32)


def load_transforms(path, resolution: Optional[int] = None, background=(1.0, 1.0, 1.0)) -> PosedImages:
    """Load every frame of one transforms file. resolution: downscale images to this width (keeping the aspect)."""
    source = Path(path)
    meta = _read_json(source)
    base = source.parent
    bg = torch.as_tensor(background, dtype=torch.float32).reshape(3)
    images, mats, intr, paths = [], [], [], []
    size = None
    n_undistorted, unsupported_lens = 0, False
    for index, frame in enumerate(meta["frames"]):
        if not isinstance(frame, dict):
            raise FastDreamError(f"{source}: frame {index} is a {type(frame).__name__}, not an object with file_path and transform_matrix.")
        mats.append(_frame_matrix(frame, index, source))
        image_path = _resolve_image(base, frame.get("file_path"), index, source)
        image = _read_image(image_path, bg)
        h, w = image.shape[:2]
        if size is None:
            size = (w, h)
        elif (w, h) != size:
            raise FastDreamError(f"{source}: image {image_path} is {w}x{h} but the first image is {size[0]}x{size[1]}; "
                                 "all images of a split must have the same size.")
        frame_meta = {k: v for k, v in meta.items() if k in _INTRINSIC_KEYS}
        frame_meta.update({k: v for k, v in frame.items() if k in _INTRINSIC_KEYS})
        intr.append(_intrinsics(frame_meta, w, h, index, source))
        coeffs = [_number(frame_meta.get(k, 0.0), f"{k} (frame {index})", source) for k in _DISTORTION_KEYS]
        if any(coeffs):
            image = undistort_image(image, *intr[-1], *coeffs)
            n_undistorted += 1
        if any(frame_meta.get(k) for k in _UNSUPPORTED_LENS_KEYS):
            unsupported_lens = True
        images.append(image)
        paths.append(image_path)
    if n_undistorted:
        log.info("fastdream: %s: undistorted %d image(s) with their lens coefficients (k1, k2, k3, p1, p2).",
                 source, n_undistorted)
    if unsupported_lens:
        log.warning("fastdream: %s describes a fisheye lens (k4 / is_fisheye), which fastdream does not model; the "
                    "images are used as if taken by a pinhole camera (after the k1, k2, k3, p1, p2 correction), so "
                    "fine detail near the image borders will not line up.", source)
    w, h = size
    stack = torch.stack(images)  # colour and alpha go through the undistortion and the downscaling together
    fx, fy, cx, cy = (torch.tensor(v, dtype=torch.float32) for v in zip(*intr))
    if resolution is not None and resolution != w:
        if resolution < 1 or resolution > w:
            raise FastDreamError(f"--resolution {resolution} is not possible for {source}: its images are {w} px wide "
                                 "and can only be downscaled (give a width between 1 and the image width).")
        new_w, new_h = int(resolution), max(1, int(round(h * resolution / w)))
        stack = F.interpolate(stack.permute(0, 3, 1, 2), size=(new_h, new_w), mode="area").permute(0, 2, 3, 1).clamp(0.0, 1.0)
        sx, sy = new_w / w, new_h / h
        fx, fy, cx, cy = fx * sx, fy * sy, cx * sx, cy * sy
        w, h = new_w, new_h
    alphas = stack[..., 3].contiguous()
    return PosedImages(images=stack[..., :3].contiguous(), c2w=torch.stack(mats), fx=fx, fy=fy, cx=cx, cy=cy,
                       width=w, height=h, aabb=scene_aabb(meta, source), paths=paths, source=source,
                       centre_aabb=centre_aabb(meta), alphas=None if bool((alphas == 1.0).all()) else alphas)


def load_dataset(data_dir, resolution: Optional[int] = None, background=(1.0, 1.0, 1.0)) -> Tuple[PosedImages, PosedImages]:
    """(train, test) from a dataset folder (or a transforms*.json path).

    transforms_train.json (+ transforms_test.json, else transforms_val.json) -> those splits;
    transforms.json -> every 8th frame (0, 8, 16, ...) held out for test, the rest for training.
    """
    root = Path(data_dir)
    if root.is_file():
        single, root = root, root.parent
    elif root.is_dir():
        single = None
    else:
        raise FastDreamError(f"Dataset {root} does not exist; give a folder with transforms.json, or "
                             "transforms_train.json and transforms_test.json.")
    if single is None and (root / "transforms_train.json").is_file():
        train = load_transforms(root / "transforms_train.json", resolution, background)
        for name in ("transforms_test.json", "transforms_val.json"):
            if (root / name).is_file():
                test = load_transforms(root / name, resolution, background)
                test.aabb, test.centre_aabb = train.aabb, train.centre_aabb
                return train, test
        log.info("fastdream: %s has no transforms_test.json; holding out every %dth training frame.", root, HOLDOUT_EVERY)
        return _holdout(train)
    if single is None:
        single = root / "transforms.json"
        if not single.is_file():
            raise FastDreamError(f"Dataset folder {root} has neither transforms.json nor transforms_train.json "
                                 "(the NeRF-synthetic / instant-ngp camera files).")
    return _holdout(load_transforms(single, resolution, background))


def _holdout(data: PosedImages) -> Tuple[PosedImages, PosedImages]:
    n = len(data)
    if n < 2:
        raise FastDreamError(f"{data.source} has only {n} frame; at least 2 are needed (every {HOLDOUT_EVERY}th frame is held out for evaluation).")
    test_idx = list(range(0, n, HOLDOUT_EVERY))
    train_idx = [i for i in range(n) if i % HOLDOUT_EVERY != 0]
    return data.subset(train_idx), data.subset(test_idx)
