"""KServe v2 datatype names and their numpy equivalents.

BF16 has no numpy type: it travels as 2-byte words and is widened to float32 on decode (and rounded
back on encode), which is what every CPU consumer does with it anyway.
"""

from __future__ import annotations

import numpy as np

NUMPY_OF: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.float32),
    "BYTES": np.dtype(np.object_),
}
DATATYPES = tuple(NUMPY_OF)
_KSERVE_OF = {dt: name for name, dt in NUMPY_OF.items() if name not in ("BF16", "BYTES")}


def kserve_datatype(dtype: np.dtype) -> str:
    """The KServe name of a numpy dtype (object and bytes/str arrays are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _KSERVE_OF[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no KServe v2 datatype") from None


def wire_itemsize(datatype: str) -> int:
    """Bytes per element on the wire (0 for BYTES, whose elements are length-prefixed)."""
    if datatype == "BYTES":
        return 0
    if datatype == "BF16":
        return 2
    return NUMPY_OF[datatype].itemsize
