"""The input photo of an image-to-3D run: read, masked, recentred and resized.

`load_input_image(path)` reads PNG/JPEG/WebP/... (8- or 16-bit, grey, grey+alpha, RGB or RGBA) with imageio
and returns an `InputImage`: the object's colour and its mask, square, at `resolution` pixels.

* The mask is the alpha channel when the image has a non-trivial one. An image without alpha (or with an
  opaque one) needs background removal: `rembg` is used when it is installed and its model is already on
  disk (it must not download during a run); otherwise the error asks for an RGBA image. A guessed mask is
  never made up.
* Recentring follows stable-dreamfusion's / threestudio's image preprocessing: the mask's bounding box is
  cut out, scaled so that its longer side fills ``1 - border_ratio`` of the square, and pasted in the
  centre. Without recentring the image is padded to a square around its centre and resized.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FastDreamError

ALPHA_EMPTY = 0.5  # mask value above which a pixel belongs to the object (bounding box, emptiness check)


@dataclass
class InputImage:
    rgb: torch.Tensor   # (3, R, R) in [0, 1], the object's colour (straight, not premultiplied)
    mask: torch.Tensor  # (1, R, R) in [0, 1]

    def on_background(self, color=(1.0, 1.0, 1.0)) -> torch.Tensor:
        """(3, R, R): the object composited over a solid colour (white for Zero-1-to-3)."""
        bg = torch.as_tensor(color, dtype=self.rgb.dtype).view(3, 1, 1)
        return self.rgb * self.mask + bg * (1 - self.mask)


def read_image(path) -> np.ndarray:
    """(H, W, C) float32 in [0, 1] with C in {1, 2, 3, 4}; FastDreamError for a missing or unreadable file."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise FastDreamError(f"The input image {path} does not exist (or is not a file); pass a PNG/JPEG photo of "
                             "the object, ideally an RGBA PNG whose alpha masks the object.")
    try:
        with warnings.catch_warnings():  # on a corrupt file imageio tries every plugin, some deprecated
            warnings.simplefilter("ignore")
            data = np.asarray(iio.imread(path, index=0))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FastDreamError(f"The input image {path} could not be read as an image ({first[:200]}); it may be "
                             "corrupt or of an unsupported format. Pass a PNG or JPEG file.") from None
    if data.dtype == np.uint8:
        x = data.astype(np.float32) / 255.0
    elif data.dtype == np.uint16:
        x = data.astype(np.float32) / 65535.0
    elif np.issubdtype(data.dtype, np.floating):
        x = np.clip(data.astype(np.float32), 0.0, 1.0)
    else:
        raise FastDreamError(f"The input image {path} has pixels of type {data.dtype}; use an 8- or 16-bit image.")
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 2, 3, 4) or min(x.shape[:2]) < 8:
        raise FastDreamError(f"The input image {path} has shape {data.shape}; expected a grey, grey+alpha, RGB or "
                             "RGBA image at least 8 pixels on each side.")
    return x


def remove_background(rgb: np.ndarray, path) -> np.ndarray:
    """(H, W) mask from rembg when it is installed and its model is on disk; otherwise a FastDreamError."""
    ask = (f"The input image {path} has no alpha channel to mask the object, and no offline background removal "
           "is available{why}. Pass an RGBA PNG whose alpha is the object's mask (any photo editor or "
           "`pip install rembg` followed by `rembg i photo.jpg photo.png` makes one).")
    try:
        import rembg
    except ImportError:
        raise FastDreamError(ask.format(why=" (rembg is not installed)")) from None
    model = "u2net"
    home = Path(os.environ.get("U2NET_HOME", Path(os.environ.get("XDG_DATA_HOME", "~")).expanduser() / ".u2net"))
    if not (home / f"{model}.onnx").is_file():
        raise FastDreamError(ask.format(why=f" (rembg's model {home / (model + '.onnx')} is not downloaded)"))
    try:
        session = rembg.new_session(model)
        cut = np.asarray(rembg.remove((rgb * 255).astype(np.uint8), session=session))
    except Exception as exc:
        raise FastDreamError(ask.format(why=f" (rembg failed: {type(exc).__name__}: {exc})")) from None
    if cut.ndim != 3 or cut.shape[-1] != 4:
        raise FastDreamError(ask.format(why=" (rembg returned no alpha)"))
    return cut[..., 3].astype(np.float32) / 255.0


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    return F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False,
                         antialias=(h > height or w > width))[0]


def load_input_image(path, resolution: int = 256, border_ratio: float = 0.2, recenter: bool = True) -> InputImage:
    """The input image at `resolution` x `resolution`: colour and mask, the object recentred (see the module)."""
    if not 0.0 <= border_ratio < 1.0:
        raise FastDreamError(f"The border ratio must lie in [0, 1), got {border_ratio}.")
    x = read_image(path)
    channels = x.shape[-1]
    colour = x[..., :3] if channels >= 3 else np.repeat(x[..., :1], 3, axis=-1)  # grey -> RGB
    alpha = x[..., -1] if channels in (2, 4) else None
    if alpha is None or alpha.min() > 0.99:
        alpha = remove_background(colour, path)
    if (alpha > ALPHA_EMPTY).sum() < 4:
        raise FastDreamError(f"The input image {path} is (almost) fully transparent: its mask holds no object.")
    rgba = torch.from_numpy(np.concatenate([colour * alpha[..., None], alpha[..., None]], -1)).permute(2, 0, 1)
    R = int(resolution)
    if recenter:
        ys, xs = np.nonzero(alpha > ALPHA_EMPTY)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = rgba[:, y0:y1, x0:x1]
        side = max(1, int(round(R * (1.0 - border_ratio))))
        h, w = y1 - y0, x1 - x0
        scale = side / max(h, w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        canvas = torch.zeros(4, R, R)
        top, left = (R - nh) // 2, (R - nw) // 2
        canvas[:, top:top + nh, left:left + nw] = _resize(crop, nh, nw)
    else:
        h, w = rgba.shape[-2:]
        n = max(h, w)
        square = torch.zeros(4, n, n)
        square[:, (n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = rgba
        canvas = _resize(square, R, R)
    mask = canvas[3:].clamp(0, 1)
    rgb = torch.where(mask > 1e-4, canvas[:3] / mask.clamp_min(1e-4), torch.ones_like(canvas[:3])).clamp(0, 1)
    return InputImage(rgb=rgb.contiguous(), mask=mask.contiguous())
