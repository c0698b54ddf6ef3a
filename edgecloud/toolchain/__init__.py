"""The toolchain that makes the demo models: synthetic data, training, ONNX export, INT8 quantization,
calibration and model cards.

Only :mod:`~edgecloud.toolchain.nets`, :mod:`~edgecloud.toolchain.train`,
:mod:`~edgecloud.toolchain.export` and :mod:`~edgecloud.toolchain.build` need torch (the ``train``
extra); the data set, evaluation and the ``calibrate`` command run on a device with numpy and ONNX
Runtime alone.
"""

from pathlib import Path

#: the repository's ``models/`` directory, where the shipped artifacts and cards live
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
