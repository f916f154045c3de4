"""The input photo of an image-to-3D run: formats, masks, recentring and clear errors."""
import sys
import types

import numpy as np
import pytest
import torch

from fastdream.errors import FastDreamError
from fastdream.image_input import load_input_image


def write(path, array):
    import imageio.v3 as iio

    iio.imwrite(path, array)
    return path


def write_png16(path, array):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): colour type 0 (grey) or 6 (RGBA)."""
    import struct
    import zlib

    h, w = array.shape[:2]
    colour_type = {1: 0, 4: 6}[1 if array.ndim == 2 else array.shape[2]]
    rows = array.reshape(h, -1).astype(">u2").tobytes()
    stride = len(rows) // h
    raw = b"".join(b"\x00" + rows[i * stride:(i + 1) * stride] for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def object_rgba(h=60, w=90, box=(10, 30, 50, 70), colour=(200, 40, 20), dtype=np.uint8):
    """A transparent image holding an opaque coloured rectangle rows box[0]:box[1], columns box[2]:box[3]."""
    top = 255 if dtype == np.uint8 else 65535
    img = np.zeros((h, w, 4), dtype=dtype)
    y0, y1, x0, x1 = box
    img[y0:y1, x0:x1, :3] = (np.asarray(colour, dtype=np.float64) / 255 * top).astype(dtype)
    img[y0:y1, x0:x1, 3] = top
    return img


def bbox(mask):
    ys, xs = np.nonzero(mask.numpy()[0] > 0.5)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def test_off_centre_object_of_any_size_is_recentred_and_rescaled(tmp_path):
    """An object in a corner of a wide image comes out centred, its longer side filling 1 - border of the square."""
    path = write(tmp_path / "corner.png", object_rgba(h=60, w=90, box=(5, 25, 60, 100 - 10)))
    out = load_input_image(path, resolution=64, border_ratio=0.2)
    assert out.rgb.shape == (3, 64, 64) and out.mask.shape == (1, 64, 64)
    y0, y1, x0, x1 = bbox(out.mask)
    assert abs((x1 - x0) - 51) <= 1  # longer side (30 px wide) -> 0.8 * 64
    assert abs((y1 - y0) - 34) <= 1  # aspect ratio kept (20 x 30)
    assert abs((y0 + y1) / 2 - 32) <= 1 and abs((x0 + x1) / 2 - 32) <= 1
    inside = out.mask[0] > 0.99
    torch.testing.assert_close(out.rgb[:, inside].mean(1), torch.tensor([200, 40, 20]) / 255.0, atol=0.01, rtol=0)
    white = out.on_background()
    assert torch.allclose(white[:, 0, 0], torch.ones(3))  # background is white where the mask is empty
    # without recentring the framing is kept (padded to a square)
    kept = load_input_image(path, resolution=90, recenter=False)
    assert bbox(kept.mask) == (15 + 5, 15 + 25, 60, 90)


def test_sixteen_bit_and_grey_images(tmp_path):
    eight = load_input_image(write(tmp_path / "8.png", object_rgba()), resolution=32)
    sixteen = load_input_image(write_png16(tmp_path / "16.png", object_rgba(dtype=np.uint16)), resolution=32)
    torch.testing.assert_close(sixteen.rgb, eight.rgb, atol=2e-3, rtol=0)
    torch.testing.assert_close(sixteen.mask, eight.mask, atol=2e-3, rtol=0)
    grey_alpha = np.zeros((40, 40, 2), dtype=np.uint8)  # grey + alpha (PNG "LA")
    grey_alpha[10:30, 10:20] = (128, 255)
    grey = load_input_image(write(tmp_path / "la.png", grey_alpha), resolution=32)
    inside = grey.mask[0] > 0.99
    assert inside.any()
    torch.testing.assert_close(grey.rgb[:, inside], torch.full((3, int(inside.sum())), 128 / 255.0), atol=1e-3, rtol=0)


def test_rgb_without_background_removal_asks_for_rgba(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rembg", None)  # not installed
    rgb = write(tmp_path / "photo.jpg", np.full((40, 40, 3), 120, dtype=np.uint8))
    with pytest.raises(FastDreamError, match="RGBA"):
        load_input_image(rgb)
    opaque = object_rgba()
    opaque[..., 3] = 255  # an alpha channel that masks nothing is no mask either
    with pytest.raises(FastDreamError, match="no alpha channel"):
        load_input_image(write(tmp_path / "opaque.png", opaque))
    grey16 = write_png16(tmp_path / "grey16.png", np.full((40, 40), 99 * 257, dtype=np.uint16))
    with pytest.raises(FastDreamError, match="rembg is not installed"):
        load_input_image(grey16)


def test_rgb_uses_rembg_when_it_works_offline(tmp_path, monkeypatch):
    calls = []

    def remove(pixels, session=None):
        calls.append(session)
        out = np.concatenate([pixels, np.zeros(pixels.shape[:2] + (1,), np.uint8)], -1)
        out[10:30, 5:15, 3] = 255
        return out

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(new_session=lambda name: f"session:{name}",
                                                                    remove=remove))
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    rgb = write(tmp_path / "photo.png", np.full((40, 40, 3), 120, dtype=np.uint8))
    with pytest.raises(FastDreamError, match="not downloaded"):  # it would download: refused
        load_input_image(rgb)
    (tmp_path / "u2net.onnx").write_bytes(b"weights")
    out = load_input_image(rgb, resolution=40, recenter=False)
    assert calls == ["session:u2net"] and bbox(out.mask) == (10, 30, 5, 15)


def test_unreadable_and_empty_images_are_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    good = (tmp_path / "good.png")
    write(good, object_rgba())
    corrupt.write_bytes(good.read_bytes()[:40])  # a truncated PNG
    with pytest.raises(FastDreamError, match="could not be read"):
        load_input_image(corrupt)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(FastDreamError, match="could not be read"):
        load_input_image(tmp_path / "text.png")
    with pytest.raises(FastDreamError, match="does not exist"):
        load_input_image(tmp_path / "missing.png")
    with pytest.raises(FastDreamError, match="transparent"):
        load_input_image(write(tmp_path / "empty.png", np.zeros((20, 20, 4), np.uint8)))
    with pytest.raises(FastDreamError, match="at least 8 pixels"):
        load_input_image(write(tmp_path / "tiny.png", object_rgba(h=4, w=4, box=(0, 2, 0, 2))))
