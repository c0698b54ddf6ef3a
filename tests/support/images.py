"""Camera-like frames for tests: smooth scenes as pixels, encoded as JPEG or PNG, and the tensor a local
app would make from the same pixels by hand (the tensor path the frames path must agree with)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

#: JPEG quality 95 against the same pixels sent as a tensor: the largest difference per value (0-1 scale);
#: measured 2/255 on scenes from 16x16 to 1280x720 (edgecloud/preprocess.py)
JPEG_TOLERANCE = 3 / 255


def scene(seed: int, height: int, width: int, channels: int = 1) -> np.ndarray:
    """uint8 [H, W, C]: a gradient and a few soft blobs, like a lit part on a belt (JPEG keeps it well)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / max(height - 1, 1), x / max(width - 1, 1)
    out = np.empty((height, width, channels), dtype=np.float32)
    for c in range(channels):
        a, b = rng.uniform(-60, 60, 2)
        value = 120 + a * x + b * y
        for _ in range(3):
            cy, cx = rng.uniform(0.1, 0.9, 2)
            r, amp = rng.uniform(0.1, 0.3), rng.uniform(-80, 80)
            value += amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        out[..., c] = value
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """``pixels`` [H, W, C] as a JPEG or PNG file's bytes."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def tensor_of(pixels: np.ndarray, size: tuple[int, int], scale: float = 1 / 255, mean: float = 0.0,
              std: float = 1.0, bgr: bool = False) -> np.ndarray:
    """The NCHW FP32 row a local app makes from ``pixels``: bilinear resize to ``size`` [H, W], then
    ``(pixels * scale - mean) / std``."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    resized = np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32)
    resized = resized.reshape(size[0], size[1], -1)
    if bgr:
        resized = resized[..., ::-1]
    return ((resized * scale - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` gray pixels and holds almost none: a decompression bomb's
    header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def gif(pixels: np.ndarray) -> bytes:
    """``pixels`` as a GIF: a real image in a format frames may not come in."""
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0]).save(buffer, format="GIF")
    return buffer.getvalue()
