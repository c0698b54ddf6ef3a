"""A detection training set from the hard-example store: the cloud detector's boxes of each stored frame
as a COCO-style JSON beside the exported images (docs/design.md §10).

The store keeps each escalated frame with the cloud's outputs, boxes among them, in the cloud model's
input pixels; the cloud detector's card says which outputs they are, the score threshold, the labels
and how a frame became the input, so the boxes are written in the frame's own pixels, as COCO's
``[x, y, width, height]``. Categories are the card's labels, ids from 1.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgecloud.confidence.detection import DetectionOutputs
from edgecloud.errors import EdgecloudError
from edgecloud.files import atomic_write
from edgecloud.modelcard import ModelCardError, card_detection, card_preprocess
from edgecloud.preprocess import Preprocess
from edgecloud.protocol.detections import label_of

#: the COCO file written beside the exported images and their labels file
COCO_FILE = "coco.json"


@dataclass(frozen=True, slots=True)
class DetectionExport:
    """What a COCO export reads from the cloud detector's card."""

    outputs: DetectionOutputs
    labels: tuple[str, ...]
    #: how a frame became the model's input (None: boxes are in the frame's pixels already)
    preprocess: Preprocess | None = None

    @classmethod
    def from_card(cls, path: Path) -> DetectionExport:
        """The detection card at ``path``; EdgecloudError naming it when it is no detection card."""
        where = f"detection card {path}"
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EdgecloudError(f"{where} is unreadable: {e}") from None
        if not isinstance(data, dict):
            raise EdgecloudError(f"{where} is not a JSON object")
        try:
            outputs = card_detection(data, where)
            preprocess = card_preprocess(data, where)
        except ModelCardError as e:
            raise EdgecloudError(str(e)) from None
        if outputs is None:
            raise EdgecloudError(f"{where}: task {data.get('task')!r} is not 'detection'")
        return cls(outputs, tuple(data.get("labels") or ()), preprocess)


def coco_document(frames: Sequence[bytes], files: Sequence[str],
                  cloud_outputs: Sequence[Mapping[str, np.ndarray]],
                  export: DetectionExport) -> dict[str, Any]:
    """The COCO document of ``frames`` (encoded, named ``files``) with the cloud's boxes >= the
    threshold of each (``cloud_outputs``, one row's outputs per frame)."""
    out = export.outputs
    images, annotations, used = [], [], set()
    for i, (data, name, values) in enumerate(zip(frames, files, cloud_outputs)):
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        scores = np.asarray(values[out.scores], dtype=np.float64).reshape(-1)
        boxes = np.asarray(values[out.boxes], dtype=np.float64).reshape(-1, 4)
        classes = np.asarray(values[out.classes]).reshape(-1)
        for k in np.flatnonzero(scores >= out.score_threshold):
            box = tuple(boxes[k]) if export.preprocess is None else export.preprocess.frame_box(
                boxes[k], width, height)
            x1, y1, x2, y2 = box
            used.add(int(classes[k]))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": int(classes[k]) + 1,
                                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                                "area": round((x2 - x1) * (y2 - y1), 3), "iscrowd": 0,
                                "score": round(float(scores[k]), 6)})
    count = max([len(export.labels), *(c + 1 for c in used)])
    categories = [{"id": c + 1, "name": label_of(c, export.labels)} for c in range(count)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(path: Path, frames: Sequence[bytes], files: Sequence[str],
               cloud_outputs: Sequence[Mapping[str, np.ndarray]], export: DetectionExport) -> int:
    """Write the COCO document atomically; returns how many boxes it holds."""
    missing = [n for n in export.outputs.names() if cloud_outputs and n not in cloud_outputs[0]]
    if missing:
        raise EdgecloudError(f"the stored cloud outputs have no {missing}; is the card the cloud detector's?")
    document = coco_document(frames, files, cloud_outputs, export)
    atomic_write(path, (json.dumps(document, indent=1) + "\n").encode())
    return len(document["annotations"])
