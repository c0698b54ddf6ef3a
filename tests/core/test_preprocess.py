"""Frames to tensors (docs/design.md §10): the tensor a frame gives, the spec's checks, and every bad frame
refused by row without decoding more than its header allows."""

from __future__ import annotations

import resource

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecloud.errors import InvalidInput, ModelLoadError
from edgecloud.modelcard import ModelCardError, card_preprocess
from edgecloud.preprocess import Geometry, Preprocess, decode_frames, remap_boxes
from edgecloud.tensors import TensorSpec
from tests.support.images import JPEG_TOLERANCE, encode, gif, png_header, scene, tensor_of

GRAY = Preprocess(input="image", frames="frames", color="gray", size=(16, 16))


def frames(*items: bytes) -> np.ndarray:
    return np.array(items, dtype=np.object_)


@pytest.mark.parametrize("size", [(16, 16), (48, 64), (480, 640), (31, 17)])
def test_a_png_frame_gives_the_tensor_of_its_pixels(size):
    pixels = scene(1, *size)
    got = decode_frames(frames(encode(pixels, "PNG")), GRAY, "FP32").tensor
    np.testing.assert_allclose(got, tensor_of(pixels, (16, 16)), atol=1e-6)
    assert got.dtype == np.float32 and got.shape == (1, 1, 16, 16)


@pytest.mark.parametrize("size", [(16, 16), (48, 64), (480, 640)])
def test_a_jpeg_frame_differs_from_its_pixels_by_compression_only(size):
    pixels = scene(2, *size)
    got = decode_frames(frames(encode(pixels, "JPEG")), GRAY, "FP32").tensor
    assert np.abs(got - tensor_of(pixels, (16, 16))).max() < JPEG_TOLERANCE


def test_colour_layout_normalization_and_datatype():
    pixels = scene(3, 20, 30, channels=3)
    data = frames(encode(pixels, "PNG"), encode(pixels[::-1], "PNG"))
    rgb = Preprocess(input="x", frames="f", color="rgb", size=(10, 12), mean=(0.5, 0.4, 0.3), std=(0.2,))
    want = np.concatenate([tensor_of(p, (10, 12), mean=np.array([0.5, 0.4, 0.3]), std=0.2)
                           for p in (pixels, pixels[::-1])])
    np.testing.assert_allclose(decode_frames(data, rgb, "FP32").tensor, want, atol=1e-5)
    bgr = rgb.model_copy(update={"color": "bgr", "mean": (0.0,), "std": (1.0,), "layout": "NHWC"})
    got = decode_frames(data, bgr, "FP32").tensor
    assert got.shape == (2, 10, 12, 3)
    want = np.concatenate([tensor_of(p, (10, 12), bgr=True) for p in (pixels, pixels[::-1])])
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-5)
    raw = decode_frames(data, rgb.model_copy(update={"scale": 1.0, "mean": (0.0,), "std": (1.0,)}), "UINT8")
    assert raw.tensor.dtype == np.uint8 and raw.tensor.max() > 1


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_black():
    wide = np.full((10, 40, 1), 200, dtype=np.uint8)
    spec = GRAY.model_copy(update={"resize": "letterbox", "scale": 1.0})
    got = decode_frames(frames(encode(wide, "PNG")), spec, "FP32").tensor[0, 0]
    assert (got[:6] == 0).all() and (got[10:] == 0).all()  # 40x10 fits 16x4, centred
    assert (got[6:10] == 200).all()


def test_thumbnails_come_with_the_frames_when_asked():
    pixels = scene(4, 64, 64)
    out = decode_frames(frames(encode(pixels, "PNG")), GRAY, "FP32", thumbnails=True)
    assert out.thumbnails.shape == (1, 16, 16) and 0 < out.thumbnails.mean() < 255
    assert decode_frames(frames(encode(pixels, "PNG")), GRAY, "FP32").thumbnails is None


BAD = {
    "truncated JPEG": lambda ok: ok[: len(ok) // 2],
    "zero bytes": lambda ok: b"",
    "50000x50000 header": lambda ok: png_header(50_000, 50_000),
    "unsupported format": lambda ok: gif(scene(5, 16, 16)),
    "not an image": lambda ok: b"\x00garbage" * 10,
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_frame_is_refused_naming_its_row(kind):
    ok = encode(scene(6, 64, 64), "JPEG")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidInput, match="frame row 1"):
        decode_frames(frames(ok, BAD[kind](ok), ok), GRAY, "FP32")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200_000, f"decoding a bad frame took {grown_kib} KiB"  # 50000² gray is 2.5 GB


def test_the_pixel_limit_is_the_callers():
    big = encode(scene(7, 100, 100), "PNG")
    with pytest.raises(InvalidInput, match="100x100 is 10000 pixels, more than the limit of 9999"):
        decode_frames(frames(big), GRAY, "FP32", max_pixels=9999)
    assert decode_frames(frames(big), GRAY, "FP32", max_pixels=10_000).tensor.shape == (1, 1, 16, 16)


def test_a_spec_is_checked_and_must_fit_its_model():
    with pytest.raises(ValueError, match="mean must hold 1 or 3 values"):
        Preprocess(input="x", frames="f", size=(8, 8), mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="std must not be 0"):
        Preprocess(input="x", frames="f", size=(8, 8), std=(0.0,))
    image = TensorSpec("image", "FP32", (-1, 1, 16, 16))
    assert GRAY.check_fits((image,), "m") == image
    with pytest.raises(ModelLoadError, match=r"takes rows of \[3, 16, 16\]"):
        GRAY.check_fits((TensorSpec("image", "FP32", (-1, 3, 16, 16)),), "m")
    with pytest.raises(ModelLoadError, match="does not have"):
        GRAY.check_fits((TensorSpec("pixels", "FP32", (-1, 1, 16, 16)),), "m")
    with pytest.raises(ModelLoadError, match="INT64"):
        GRAY.check_fits((TensorSpec("image", "INT64", (-1, 1, 16, 16)),), "m")


def test_a_cards_preprocess_is_read_and_a_bad_one_named():
    card = {"preprocess": {"input": "image", "frames": "frames", "color": "gray", "size": [16, 16]}}
    assert card_preprocess(card) == GRAY
    assert card_preprocess({}) is None
    with pytest.raises(ModelCardError, match="preprocess: layout"):
        card_preprocess({"preprocess": {**card["preprocess"], "layout": "CHW"}})


# -- geometry: boxes between a frame's pixels and an input's ---------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["stretch", "letterbox"]), st.integers(4, 64), st.integers(4, 64), st.integers(1, 400),
       st.integers(1, 400), st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_a_box_in_a_frame_comes_back_from_the_input(resize, h, w, width, height, corners):
    """from_frame then to_frame is the identity on boxes inside the frame; the wire form parses back."""
    geometry = Geometry((h, w), resize)
    x1, x2 = sorted(corners[:2])
    y1, y2 = sorted(corners[2:])
    box = np.array([[x1 * width, y1 * height, x2 * width, y2 * height]])
    inside = geometry.from_frame(box, width, height)
    assert np.all(inside >= 0) and np.all(inside[:, [0, 2]] <= w) and np.all(inside[:, [1, 3]] <= h)
    np.testing.assert_allclose(geometry.to_frame(inside, width, height), box, rtol=1e-9, atol=1e-9)
    assert Geometry.parse(str(geometry)) == geometry


@pytest.mark.parametrize("text", ["", "letterbox", "fill 16x16", "letterbox 0x16", "stretch 16 x 16",
                                  "letterbox 16x16 ", "stretch -1x4"])
def test_a_geometry_that_is_none_is_refused(text):
    with pytest.raises(ValueError, match="no frame geometry"):
        Geometry.parse(text)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_boxes_land_where_the_frame_pixels_land(resize):
    """A white rectangle in a 64 x 48 frame, decoded at 32 x 32: the input's white pixels are where
    from_frame puts the rectangle, to the pixel (bilinear edges are grey)."""
    pixels = np.zeros((48, 64, 1), dtype=np.uint8)
    pixels[12:30, 8:40] = 255
    spec = Preprocess(input="image", frames="frames", color="gray", size=(32, 32), resize=resize)
    image = decode_frames(frames(encode(pixels, "PNG")), spec, "FP32").tensor[0, 0]
    ys, xs = np.nonzero(image > 0.5)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
    want = spec.geometry.from_frame(np.array([[8.0, 12.0, 40.0, 30.0]]), 64, 48)[0]
    np.testing.assert_allclose(found, want, atol=1.0)
    decoded = decode_frames(frames(encode(pixels, "PNG"), encode(pixels[:20], "PNG")), spec, "FP32")
    assert decoded.sizes.tolist() == [[64, 48], [64, 20]]


def test_remapped_boxes_go_through_each_frames_own_pixels_and_padding_stays():
    cloud, edge = Geometry((32, 32), "letterbox"), Geometry((16, 16), "stretch")
    boxes = np.array([[[0, 4, 32, 28], [8, 8, 16, 16]], [[0, 0, 32, 32], [0, 0, 0, 0]]], dtype=np.float32)
    scores = np.array([[0.9, 0.4], [0.7, 0.0]], dtype=np.float32)
    sizes = np.array([[64, 48], [32, 64]])
    got = remap_boxes(boxes, scores, sizes, cloud, edge)
    # frame 0 (64 x 48) sits at y 4..28 in the cloud's 32 x 32, so its full box is the edge's full input
    np.testing.assert_allclose(got[0, 0], [0, 0, 16, 16], atol=1e-5)
    # (8, 8)-(16, 16) is (16, 8)-(32, 24) in the frame: x / 4 and y / 3 in the edge's 16 x 16
    np.testing.assert_allclose(got[0, 1], [4, 8 / 3, 8, 8], atol=1e-5)
    # frame 1 (32 x 64) sits at x 8..24: the cloud's full box is clipped to the frame, the edge's full
    np.testing.assert_allclose(got[1, 0], [0, 0, 16, 16], atol=1e-5)
    assert got[1, 1].tolist() == [0, 0, 0, 0] and got.dtype == np.float32
