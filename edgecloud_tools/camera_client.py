"""A camera-style local app for the demo (docs/design.md §10): JPEG frames of several sizes sent through
tritonclient, labels read back, and a still stream whose repeated, slightly noisy frames reuse the
cloud's answer instead of escalating again.

Run as ``python -m edgecloud_tools.camera_client --url HOST:PORT --model NAME``; it prints one JSON line.
It never imports edgecloud's generated stubs: tritonclient bundles its own ``inference`` descriptors.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import tritonclient.grpc as grpcclient

from edgecloud_tools.camera_frames import CAMERA_SIZES, camera_frame
from edgecloud_tools.toolchain.dataset import LABELS, make_split

STREAM = "line-1/cam-1"
#: sensor noise between two frames of a still scene, in 0-1 pixel units
NOISE = 1.5 / 255
_ITEMSIZE = {"FP32": 4, "FP16": 2, "FP64": 8, "UINT8": 1}


def _param(result, key: str, kind: str):
    params = result.get_response().parameters
    return getattr(params[key], kind) if key in params else None


def run(url: str, model: str, n: int, still: int) -> dict:
    client = grpcclient.InferenceServerClient(url)
    meta = client.get_model_metadata(model, as_json=True)
    frames_input = next(i["name"] for i in meta["inputs"] if i["datatype"] == "BYTES")
    tensor = meta["inputs"][0]
    tensor_bytes = math.prod(int(d) for d in tensor["shape"][1:]) * _ITEMSIZE.get(tensor["datatype"], 4)

    def ask(frame: bytes, params: dict):
        data = np.array([frame], dtype=np.object_)
        one = grpcclient.InferInput(frames_input, [1], "BYTES")
        one.set_data_from_numpy(data)
        return client.infer(model, [one], parameters=params or None)

    patches, labels = make_split("test", n)
    correct, escalated, latency_ms, frame_bytes = 0, 0, [], []
    for i, (patch, label) in enumerate(zip(patches, labels)):
        frame = camera_frame(patch, CAMERA_SIZES[i % len(CAMERA_SIZES)])
        started = time.perf_counter()
        result = ask(frame, {})
        latency_ms.append((time.perf_counter() - started) * 1000)
        frame_bytes.append(len(frame))
        correct += _param(result, "edgecloud.label", "string_param") == LABELS[int(label)]
        escalated += bool(_param(result, "edgecloud.escalated", "bool_param"))
    rng = np.random.default_rng(0)
    reused = still_escalated = 0
    for _ in range(still):  # one scene, every frame unsure (threshold 1), a little sensor noise each time
        noisy = np.clip(patches[0] + rng.normal(0, NOISE, patches[0].shape), 0, 1)
        result = ask(camera_frame(noisy, CAMERA_SIZES[0]),
                     {"edgecloud.stream": STREAM, "edgecloud.threshold": 1.0})
        reused += bool(_param(result, "edgecloud.reused", "bool_param"))
        still_escalated += bool(_param(result, "edgecloud.escalated", "bool_param"))
    client.close()
    return {"frames": n, "sizes": [list(s) for s in CAMERA_SIZES], "labelled_right": correct,
            "escalated": escalated, "p50_ms": round(float(np.percentile(latency_ms, 50)), 2) if n else None,
            "mean_frame_bytes": round(float(np.mean(frame_bytes))) if n else None,
            "tensor_bytes": tensor_bytes,
            "still": {"stream": STREAM, "frames": still, "escalated": still_escalated, "reused": reused}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="the agent, HOST:PORT")
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=100, help="frames of the held-out split to send")
    p.add_argument("--still", type=int, default=20, help="frames of one still scene on one stream")
    args = p.parse_args(argv)
    print(json.dumps(run(args.url, args.model, args.n, args.still)))


if __name__ == "__main__":
    main()
