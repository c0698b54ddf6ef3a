"""The toolchain that makes the demo models: synthetic data, training, ONNX export, INT8 quantization,
calibration and model cards.

Only :mod:`~edgecloud_tools.toolchain.nets`, :mod:`~edgecloud_tools.toolchain.train`,
:mod:`~edgecloud_tools.toolchain.export` and :mod:`~edgecloud_tools.toolchain.build` need torch (the ``train``
extra); the data set, evaluation and the ``calibrate`` command run on a device with numpy and ONNX
Runtime alone.
"""

import os
from pathlib import Path

#: environment variable naming the models directory (default: ``models`` in the working directory)
MODELS_ENV = "EDGECLOUD_MODELS"


def models_dir() -> Path:
    """Where the shipped artifacts and cards live: ``$EDGECLOUD_MODELS``, else ``./models``.

    Configuration rather than this package's own location, so an installed ``edgecloud`` finds the
    models of a checkout, an unpacked release or a mounted volume alike.
    """
    return Path(os.environ.get(MODELS_ENV) or "models")


# Where the build puts each shipped model, relative to a models directory; the demo, the benchmark
# and the build all find the models here, so a renamed artifact is renamed once.
#: the name the cloud model is served under in its repository
CLOUD_NAME = "inspection"
REPOSITORY = Path("repository")
CLOUD = REPOSITORY / CLOUD_NAME / "1" / "model.onnx"
EDGE_FP32 = Path("edge/inspection-edge-fp32.onnx")
EDGE_INT8 = Path("edge/inspection-edge-int8.onnx")
EDGE_V2_INT8 = Path("edge/inspection-edge-v2-int8.onnx")

