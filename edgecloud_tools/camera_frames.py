"""Camera-style frames from the inspection patches: a 32x32 patch upscaled to a camera's resolution and
encoded as JPEG, the way a line camera would hand it to a local app (docs/design.md §10).

numpy and Pillow only: the bench's client processes and the demo's camera client (which run tritonclient,
so never edgecloud's generated stubs) use it too.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: the camera resolutions the demo and the bench send, [H, W]
CAMERA_SIZES: tuple[tuple[int, int], ...] = ((480, 640), (720, 1280), (240, 320), (64, 64))


def camera_frame(patch: np.ndarray, size: tuple[int, int] = (480, 640), quality: int = 90) -> bytes:
    """``patch`` (float [1, H, W] or [H, W] in [0, 1]) at ``size`` [H, W], as a gray JPEG's bytes."""
    pixels = np.clip(np.rint(np.asarray(patch, dtype=np.float32).reshape(patch.shape[-2:]) * 255), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
