"""Synthetic factory-inspection patches: grayscale 32×32 surfaces, ``ok`` or with a scratch, a spot or
a crack.

numpy only, because devices without torch run it too (the demo streams the "test" split, tests
score the shipped models on it). Every sample draws its own difficulty: defect contrast and sensor
noise vary per sample, and the surface has gradients, mottling and a brushed grain that can pass for
a faint line. Most samples are easy; a tail is genuinely hard, which is what the cascade escalates.

Each sample is rendered from its own seed (split seed, index), so ``make_split(s, 1000)`` is the first
1000 samples of ``make_split(s, 10000)``, and labels are balanced in every block of four.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

LABELS: tuple[str, ...] = ("ok", "scratch", "spot", "crack")
SIZE = 32
#: the values a patch holds; the cards of models made for it declare it as their input's range
PIXEL_RANGE = (0.0, 1.0)
#: one fixed seed per split, so splits never overlap and every run sees the same samples
SEEDS: dict[str, int] = {"train": 20_240_101, "val": 20_240_202, "test": 20_240_303}

_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_COARSE = 5


def _upsampler(size: int, coarse: int) -> np.ndarray:
    """[size, coarse] matrix of bilinear weights, so ``M @ grid @ M.T`` smooths a coarse grid up."""
    pos = np.linspace(0, coarse - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), coarse - 2)
    frac = pos - lo
    m = np.zeros((size, coarse), dtype=np.float32)
    m[np.arange(size), lo] = 1 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _segment_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distance of every pixel centre to the segment p–q (points as (x, y))."""
    dx, dy = q - p
    length2 = max(float(dx * dx + dy * dy), 1e-6)
    t = np.clip(((_X - p[0]) * dx + (_Y - p[1]) * dy) / length2, 0.0, 1.0)
    return np.hypot(_X - (p[0] + t * dx), _Y - (p[1] + t * dy))


def _polyline_distance(points: np.ndarray) -> np.ndarray:
    return np.min([_segment_distance(a, b) for a, b in itertools.pairwise(points)], axis=0)


def _line_profile(distance: np.ndarray, width: float) -> np.ndarray:
    """A soft line of about ``width`` pixels: 1 on the line, fading to 0 beside it."""
    return np.exp(-0.5 * (distance / width) ** 2)


@functools.cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a ``size`` patch and its mottling upsampler."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x, _upsampler(size, _COARSE)


def surface(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A defect-free ``size``×``size`` surface: level, gradient, mottling and a brushed grain."""
    y, x, up = _grid(size)
    middle = (size - 1) / 2
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0.0, 0.25) * ((x - middle) * np.cos(angle) + (y - middle) * np.sin(angle)) / size
    mottle = up @ rng.normal(0.0, rng.uniform(0.01, 0.05), (_COARSE, _COARSE)) @ up.T
    g_angle = rng.uniform(0, np.pi)
    along = x * np.cos(g_angle) + y * np.sin(g_angle)
    grain = rng.uniform(0.0, 0.04) * np.sin(2 * np.pi * rng.uniform(0.15, 0.45) * along
                                             + rng.uniform(0, 2 * np.pi))
    return rng.uniform(0.3, 0.7) + gradient + mottle + grain


def _scratch(rng: np.random.Generator) -> np.ndarray:
    """A thin straight line, 10–26 px long."""
    centre = rng.uniform(8, 24, 2)
    angle = rng.uniform(0, np.pi)
    half = rng.uniform(5, 13) * np.array([np.cos(angle), np.sin(angle)])
    return _line_profile(_segment_distance(centre - half, centre + half), rng.uniform(0.5, 0.9))


def _spot(rng: np.random.Generator) -> np.ndarray:
    """A small, slightly elliptical blob."""
    cx, cy = rng.uniform(6, 26, 2)
    rx, ry = rng.uniform(1.5, 3.2, 2)
    return np.exp(-0.5 * (((_X - cx) / rx) ** 2 + ((_Y - cy) / ry) ** 2))


def _crack(rng: np.random.Generator) -> np.ndarray:
    """A jagged polyline: short segments with sharp turns."""
    heading = rng.uniform(0, 2 * np.pi)
    points = [rng.uniform(8, 24, 2)]
    for _ in range(rng.integers(5, 8)):
        heading += rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.3)
        step = rng.uniform(2.5, 5.0) * np.array([np.cos(heading), np.sin(heading)])
        points.append(np.clip(points[-1] + step, 1, SIZE - 2))
    return _line_profile(_polyline_distance(np.array(points)), rng.uniform(0.5, 0.9))


#: label → the shape of that defect on a [32, 32] canvas, 1 on the defect fading to 0 beside it
DEFECTS = {1: _scratch, 2: _spot, 3: _crack}


def defect_contrast(rng: np.random.Generator, label: int) -> float:
    """The signed contrast of one defect: mostly clear, one in five faint, close to the noise floor;
    cracks are dark."""
    contrast = rng.uniform(0.10, 0.15) if rng.random() < 0.2 else rng.uniform(0.15, 0.35)
    return -contrast if label == 3 or rng.random() < 0.5 else contrast


def sensor_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """``image`` with per-sample sensor noise, clipped to :data:`PIXEL_RANGE`, as float32."""
    image = image + rng.normal(0.0, rng.uniform(0.01, 0.04), image.shape)
    return np.clip(image, *PIXEL_RANGE).astype(np.float32)


def render(rng: np.random.Generator, label: int) -> np.ndarray:
    """One [32, 32] float32 patch in [0, 1] of class ``label``, difficulty drawn from ``rng``."""
    image = surface(rng)
    if label:
        image = image + defect_contrast(rng, label) * DEFECTS[label](rng)
    return sensor_noise(rng, image)


def make_split(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of ``split`` ("train", "val", "test"): images float32 [n, 1, 32, 32] in [0, 1]
    and labels int64 [n] indexing :data:`LABELS`."""
    if split not in SEEDS:
        raise ValueError(f"unknown split {split!r}; splits are {sorted(SEEDS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    seed = SEEDS[split]
    classes = len(LABELS)
    blocks = -(-n // classes)
    labels = np.concatenate([np.random.default_rng((seed, 0, b)).permutation(classes)
                             for b in range(blocks)] or [np.empty(0, dtype=np.int64)])[:n]
    images = np.empty((n, 1, SIZE, SIZE), dtype=np.float32)
    for i, label in enumerate(labels):
        images[i, 0] = render(np.random.default_rng((seed, 1, i)), int(label))
    return images, labels.astype(np.int64)
