"""Labelled data of one's own for ``edgecloud calibrate --data``: a ``.npz`` holding the model's inputs
and ``labels``, or a training set written by ``edgecloud examples export``, whose rows the cloud
labelled (``cloud_prediction``). Split once, seeded, into the part a calibration is fitted on and the
held-out part it is measured on, like the synthetic "val" and "test" splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud_gateway.hard_examples import CLOUD_PREFIX, META_KEYS
from edgecloud.errors import ConfigError

#: the array of inputs when the file names it so (else: the one array that is not a label or an export
#: column, as ``examples export`` names it after the model's input)
INPUTS_KEY = "inputs"
#: where labels are taken from, in order: ground truth, else the cloud's answers of an export
LABEL_KEYS = ("labels", "cloud_prediction")
#: optional class names, in label order, for a card written from scratch
LABEL_NAMES_KEY = "label_names"
#: the seed of the split, so that the same file always splits the same way
SPLIT_SEED = 0


@dataclass(frozen=True)
class LabelledSet:
    """Inputs [N, …] and integer labels [N], and where the labels came from."""

    inputs: np.ndarray
    labels: np.ndarray
    labelled_by: str
    label_names: tuple[str, ...] | None = None

    def split(self, held_out: float) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """(fit, held-out) parts, each (inputs, labels): a seeded permutation, ``held_out`` of the rows
        last; ConfigError when either part would be empty."""
        n = len(self.labels)
        n_test = round(n * held_out)
        if n_test < 1 or n - n_test < 1:
            raise ConfigError(f"{n} labelled rows leave no rows to fit on or none held out "
                              f"(--held-out {held_out}); give more rows")
        order = np.random.default_rng(SPLIT_SEED).permutation(n)
        fit, test = order[:n - n_test], order[n - n_test:]
        return (self.inputs[fit], self.labels[fit]), (self.inputs[test], self.labels[test])


def _inputs_key(path: Path, keys: list[str]) -> str:
    if INPUTS_KEY in keys:
        return INPUTS_KEY
    candidates = [k for k in keys if k not in META_KEYS and k not in LABEL_KEYS and k != LABEL_NAMES_KEY
                  and not k.startswith(CLOUD_PREFIX)]
    if len(candidates) != 1:
        raise ConfigError(f"--data {path}: cannot tell which array holds the inputs among "
                          f"{candidates or keys}; name it {INPUTS_KEY!r}")
    return candidates[0]


def load_labelled(path: Path) -> LabelledSet:
    """The inputs and labels of ``path`` (see the module); ConfigError naming what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"--data {path}: not a readable .npz ({e})") from None
    keys = list(arrays)
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    if label_key is None:
        raise ConfigError(f"--data {path}: no labels: expected an array {LABEL_KEYS[0]!r} (or an export's "
                          f"{LABEL_KEYS[1]!r}); it holds {keys}")
    inputs, labels = arrays[_inputs_key(path, keys)], arrays[label_key]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(inputs):
        raise ConfigError(f"--data {path}: {label_key!r} must be integers, one per input row "
                          f"({len(inputs)}); it is {labels.dtype} of shape {list(labels.shape)}")
    names = arrays.get(LABEL_NAMES_KEY)
    return LabelledSet(inputs, labels.astype(np.int64), label_key,
                       None if names is None else tuple(str(n) for n in names))
