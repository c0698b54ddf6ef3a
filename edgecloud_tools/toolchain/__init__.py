"""The toolchain that makes the demo models: synthetic data, training, ONNX export, INT8 quantization,
calibration and model cards.

Only :mod:`~edgecloud_tools.toolchain.nets`, :mod:`~edgecloud_tools.toolchain.train`,
:mod:`~edgecloud_tools.toolchain.export` and :mod:`~edgecloud_tools.toolchain.build` need torch (the ``train``
extra); the data set, evaluation and the ``calibrate`` command run on a device with numpy and ONNX
Runtime alone.
"""

import os
from importlib.resources import files
from pathlib import Path

from edgecloud.errors import ConfigError

#: environment variable naming the models directory (default: ``models`` in the working directory)
MODELS_ENV = "EDGECLOUD_MODELS"


def own_models_dir() -> Path:
    """The user's models directory, ``$EDGECLOUD_MODELS``, else ``./models``: where ``models build``
    writes and where the tools look first, so that models one builds are the ones then used."""
    return Path(os.environ.get(MODELS_ENV) or "models")


def packaged_models_dir() -> Path:
    """The demo models shipped as package data (the checkout's ``models/`` in an editable install)."""
    return Path(str(files("edgecloud_tools.models")))


def models_dir() -> Path:
    """Where the tools find the models: ``$EDGECLOUD_MODELS``, else ``./models`` when there is one,
    else the packaged demo models, so that a plain ``pip install`` runs the demo from any directory.

    Configuration first rather than this package's own location, so an installed ``edgecloud`` finds
    the models of a checkout, an unpacked release or a mounted volume alike.
    """
    own = own_models_dir()
    return own if os.environ.get(MODELS_ENV) or own.is_dir() else packaged_models_dir()


def check_found(**paths: Path | None) -> None:
    """One line naming the first flag whose file is missing, rather than a traceback further on."""
    for flag, path in paths.items():
        if path is not None and not path.exists():
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: not found (models are found through "
                              f"${MODELS_ENV}, else ./models, else the packaged demo models)")


def check_writable(path: Path, what: str) -> None:
    """Refuse to write ``what`` into an installed package (the packaged models in site-packages): an
    upgrade would silently drop it. A checkout's ``models/`` (an editable install) is the user's own."""
    package = Path(__file__).resolve().parents[1]
    if path.resolve().is_relative_to(package):
        raise ConfigError(f"{what} would go into the installed package ({path}); give a directory of "
                          f"your own (--out DIR, or copy the model with its card first)")


# Where the build puts each shipped model, relative to a models directory; the demo, the benchmark
# and the build all find the models here, so a renamed artifact is renamed once.
#: the name the cloud model is served under in its repository
CLOUD_NAME = "inspection"
REPOSITORY = Path("repository")
CLOUD = REPOSITORY / CLOUD_NAME / "1" / "model.onnx"
EDGE_FP32 = Path("edge/inspection-edge-fp32.onnx")
EDGE_INT8 = Path("edge/inspection-edge-int8.onnx")
EDGE_V2_INT8 = Path("edge/inspection-edge-v2-int8.onnx")

#: the name the cloud detector is served under in the repository, and the detectors' files
DET_CLOUD_NAME = "inspection-detect"
DET_CLOUD = REPOSITORY / DET_CLOUD_NAME / "1" / "model.onnx"
DET_EDGE_FP32 = Path("detection/inspection-detect-edge-fp32.onnx")
DET_EDGE_INT8 = Path("detection/inspection-detect-edge-int8.onnx")
