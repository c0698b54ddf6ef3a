"""Encoded frames in, model tensors out (docs/design.md §10): a model card's ``preprocess`` says which
input a client may feed as one encoded JPEG or PNG per row, and how a frame becomes that input's row.

Decoding is bounded: a frame's header is read first, and one whose width x height is over the pixel
limit is refused before a pixel is decoded (a 50,000 x 50,000 header costs nothing); a JPEG larger
than the model's size is decoded at a reduced DCT scale (``draft``), which is both faster and
smaller; the callers bound how many decodes run at once. Colour conversion and resizing run in
Pillow's C code per frame into one uint8 batch, and normalization is one vectorized numpy pass over
the batch. A frame that is empty, not JPEG or PNG, truncated or corrupt, or over the pixel limit is
InvalidInput naming its row.

Tolerance against the tensor path: a PNG frame gives exactly the tensor that the same pixels, resized
with Pillow's bilinear filter and normalized, give; a JPEG frame differs by its compression only:
at quality 95, every value was within 2/255 (before scale, mean and std) of the tensor path, and
the mean difference under 0.7/255, on smooth scenes from 16x16 to 1280x720 resized to 16x16 (the
tests allow 3/255, and the logit difference that bound implies).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import Field, model_validator

from edgecloud.config import Section
from edgecloud.errors import InvalidInput, ModelLoadError
from edgecloud.protocol.datatypes import NUMPY_OF
from edgecloud.tensors import TensorSpec

#: the encoded formats a frame may be in
FORMATS = ("JPEG", "PNG")
#: a frame's pixel limit unless the config sets one: 4096 x 4096
DEFAULT_MAX_PIXELS = 4096 * 4096
#: side of the grayscale thumbnail a stream's frames are compared by
THUMBNAIL = 16
_MODES = {"gray": "L", "rgb": "RGB", "bgr": "RGB"}
_FLOAT_KINDS = "f"


class Preprocess(Section):
    """A model card's ``preprocess`` (or a gateway model's ``[preprocess]``): the tensor fed is
    ``((pixels * scale) - mean) / std`` in the model input's datatype."""

    input: str = Field(description="the model input the frames feed")
    frames: str = Field(description="name of the BYTES input a client sends instead: one JPEG/PNG per row")
    color: Literal["gray", "rgb", "bgr"] = Field("rgb", description="channels the model expects")
    size: tuple[int, int] = Field(description="[H, W] the frame is resized to")
    resize: Literal["stretch", "letterbox"] = Field("stretch", description="stretch to [H, W], or keep the "
                                                    "aspect ratio and pad with black")
    scale: float = Field(1 / 255, description="pixels (0-255) are multiplied by it first")
    mean: tuple[float, ...] = Field((0.0,), description="subtracted per channel (one value: every channel)")
    std: tuple[float, ...] = Field((1.0,), description="divided by per channel (one value: every channel)")
    layout: Literal["NCHW", "NHWC"] = Field("NCHW", description="where the channel axis is")

    @model_validator(mode="after")
    def _consistent(self) -> Preprocess:
        if min(self.size) < 1:
            raise ValueError(f"size must be two positive numbers [H, W], not {list(self.size)}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) not in (1, self.channels):
                raise ValueError(f"{key} must hold 1 or {self.channels} values for color {self.color!r}, "
                                 f"not {len(values)}")
        if any(v == 0 for v in self.std):
            raise ValueError("std must not be 0")
        if self.frames == self.input:
            raise ValueError("frames must name another input than the one it feeds")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @property
    def row_shape(self) -> tuple[int, int, int]:
        """The shape of one row of the tensor fed."""
        h, w = self.size
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.resize)

    def frame_box(self, box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
        """A box (x1, y1, x2, y2) in the model input's pixels, in the pixels of the ``width`` x
        ``height`` frame it was made from (undoing the stretch or the letterbox), clipped to it."""
        x1, y1, x2, y2 = self.geometry.to_frame(np.asarray([box], dtype=np.float64), width, height)[0]
        return float(x1), float(y1), float(x2), float(y2)

    @property
    def frames_spec(self) -> TensorSpec:
        """The frames input as ModelMetadata lists it: BYTES, one frame per row."""
        return TensorSpec(self.frames, "BYTES", (-1,))

    def check_fits(self, inputs: Sequence[TensorSpec], model: str) -> TensorSpec:
        """The input the frames feed; ModelLoadError when the model has none of that name, or its
        datatype or per-row shape cannot take a frame made this way."""
        specs = {s.name: s for s in inputs}
        spec = specs.get(self.input)
        where = f"model {model!r}: preprocess"
        if spec is None:
            raise ModelLoadError(f"{where} feeds input {self.input!r}, which the model does not have "
                                 f"(inputs are {sorted(specs)})")
        if self.frames in specs:
            raise ModelLoadError(f"{where}: frames input {self.frames!r} is also a model input")
        if NUMPY_OF[spec.datatype].kind not in _FLOAT_KINDS + "u" or spec.datatype == "BF16":
            raise ModelLoadError(f"{where}: input {self.input!r} is {spec.datatype}; frames feed FP16, FP32, "
                                 "FP64 or UINT8 inputs")
        want = self.row_shape
        if len(spec.row_shape) != len(want) or any(d >= 0 and d != w for d, w in zip(spec.row_shape, want)):
            raise ModelLoadError(f"{where}: input {self.input!r} takes rows of {list(spec.row_shape)}; "
                                 f"color {self.color!r}, size {list(self.size)} and layout {self.layout} "
                                 f"make {list(want)}")
        return spec


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where a frame's pixels land in a model input: its [H, W] and the resize. Boxes (x1, y1, x2, y2)
    go between the two; ``str`` is the wire form, ``"letterbox 224x224"``."""

    size: tuple[int, int]
    resize: str

    def __str__(self) -> str:
        return f"{self.resize} {self.size[0]}x{self.size[1]}"

    @classmethod
    def parse(cls, text: str) -> Geometry:
        """The geometry ``str`` wrote; ValueError for anything else."""
        m = _GEOMETRY.match(text) if isinstance(text, str) else None
        if not m or min(int(m[2]), int(m[3])) < 1:
            raise ValueError(f"{text!r} is no frame geometry like 'letterbox 224x224'")
        return cls((int(m[2]), int(m[3])), m[1])

    def placement(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(inner width, inner height, left, top): where a ``width`` x ``height`` frame lands in the
        input, resized to inner width x height with its top left corner at (left, top)."""
        h, w = self.size
        if self.resize == "stretch":
            return w, h, 0, 0
        ratio = min(w / width, h / height)
        inner_w, inner_h = max(1, round(width * ratio)), max(1, round(height * ratio))
        return inner_w, inner_h, (w - inner_w) // 2, (h - inner_h) // 2

    def _scale_offset(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Per box coordinate: frame = (input - offset) * scale."""
        inner_w, inner_h, left, top = self.placement(width, height)
        sx, sy = width / inner_w, height / inner_h
        return np.array([sx, sy, sx, sy]), np.array([left, top, left, top], dtype=np.float64)

    def to_frame(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """Boxes [..., 4] in the input's pixels → in the ``width`` x ``height`` frame's, clipped to it."""
        scale, offset = self._scale_offset(width, height)
        return np.clip((boxes - offset) * scale, 0.0, np.array([width, height, width, height], dtype=float))

    def from_frame(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """Boxes [..., 4] in the ``width`` x ``height`` frame's pixels → in the input's, clipped to it."""
        scale, offset = self._scale_offset(width, height)
        h, w = self.size
        return np.clip(boxes / scale + offset, 0.0, np.array([w, h, w, h], dtype=float))


def remap_boxes(boxes: np.ndarray, scores: np.ndarray, sizes: np.ndarray, source: Geometry,
                target: Geometry) -> np.ndarray:
    """A detector's boxes [N, K, 4] in ``source``'s input pixels, in ``target``'s: frame by frame
    through the frame's own pixels (``sizes`` [N, 2]: width, height). Padding (score 0) stays."""
    out = np.array(boxes, copy=True)
    for i, (width, height) in enumerate(sizes):
        real = scores[i] > 0
        frame = source.to_frame(out[i, real].astype(np.float64), int(width), int(height))
        out[i, real] = target.from_frame(frame, int(width), int(height))
    return out


_GEOMETRY = re.compile(r"^(stretch|letterbox) ([0-9]{1,6})x([0-9]{1,6})$")


@dataclass(frozen=True, slots=True)
class Frames:
    """Decoded frames: the tensor they feed, and a grayscale thumbnail per row when asked for."""

    tensor: np.ndarray
    #: (width, height) of each frame as it was sent, [N, 2]
    sizes: np.ndarray
    thumbnails: np.ndarray | None = None


def _open(data: bytes, row: int, max_pixels: int) -> Image.Image:
    """The frame's image with only its header read; InvalidInput naming the row when it is empty, not
    JPEG or PNG, or has more pixels than ``max_pixels``."""
    if not len(data):
        raise InvalidInput(f"frame row {row}: empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidInput(f"frame row {row}: not a JPEG or PNG image ({len(data)} bytes)") from None
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise InvalidInput(f"frame row {row}: unreadable header: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInput(f"frame row {row}: {width}x{height} is {width * height} pixels, more than the "
                           f"limit of {max_pixels}")
    if not width or not height:
        raise InvalidInput(f"frame row {row}: {width}x{height} has no pixels")
    return image


def _pixels(image: Image.Image, spec: Preprocess, row: int) -> Image.Image:
    """The frame decoded, in the spec's colour, at the spec's size."""
    h, w = spec.size
    mode = _MODES[spec.color]
    # placed by the frame's own size, before a reduced DCT scale rounds it: boxes map back through it
    inner_w, inner_h, left, top = spec.geometry.placement(image.width, image.height)
    try:
        if image.format == "JPEG":
            image.draft(mode, (w, h))  # decode at the smallest DCT scale still >= the model's size
        image.load()
        image = image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"frame row {row}: truncated or corrupt {image.format}: {e}") from None
    if spec.resize == "stretch":
        return image.resize((w, h), Image.Resampling.BILINEAR)
    canvas = Image.new(mode, (w, h))
    canvas.paste(image.resize((inner_w, inner_h), Image.Resampling.BILINEAR), (left, top))
    return canvas


def thumbnail(image: Image.Image) -> np.ndarray:
    """A frame's small grayscale thumbnail (THUMBNAIL x THUMBNAIL, float32 0-255)."""
    return np.asarray(image.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX),
                      dtype=np.float32)


def decode_frames(frames: np.ndarray, spec: Preprocess, datatype: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                  thumbnails: bool = False) -> Frames:
    """The rows of ``frames`` (BYTES [N]) as the tensor ``spec`` feeds, in ``datatype``; InvalidInput
    naming the first bad row."""
    rows = frames.reshape(-1)
    h, w = spec.size
    batch = np.empty((rows.shape[0], h, w, spec.channels), dtype=np.uint8)
    thumbs = np.empty((rows.shape[0], THUMBNAIL, THUMBNAIL), dtype=np.float32) if thumbnails else None
    sizes = np.empty((rows.shape[0], 2), dtype=np.int64)
    for i, data in enumerate(rows):
        opened = _open(data, i, max_pixels)
        sizes[i] = opened.size
        image = _pixels(opened, spec, i)
        batch[i] = np.asarray(image).reshape(h, w, spec.channels)
        if thumbs is not None:
            thumbs[i] = thumbnail(image)
    if spec.color == "bgr":
        batch = batch[..., ::-1]
    values = batch.astype(np.float32) * np.float32(spec.scale)
    values -= np.asarray(spec.mean, dtype=np.float32)
    values /= np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "NCHW":
        values = values.transpose(0, 3, 1, 2)
    dtype = NUMPY_OF[datatype]
    if dtype.kind == "u":
        values = np.clip(np.rint(values), 0, np.iinfo(dtype).max)
    return Frames(np.ascontiguousarray(values, dtype=dtype), sizes, thumbs)
