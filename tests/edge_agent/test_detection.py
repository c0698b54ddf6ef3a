"""Defect detection at the edge (docs/design.md §10): a detector's frames through tritonclient, per-frame
decisions of box_mean and box_low_share, boxes out as JSON with the cloud's for escalated frames,
empty frames audited, escalated frames compared box for box, and a cloud detector of another shape
refused while the edge serves on."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from edge_agent.serving.slot import load_edge_model
from edgecloud.errors import ModelLoadError
from edgecloud.preprocess import Preprocess, decode_frames
from edgecloud.protocol.parameters import DETECTIONS, AgentResponse
from edgecloud_tools import cli
from tests.support.detectors import LABELS, detection_card, grid_detector, run_detector
from tests.support.fleet import Scrape
from tests.support.images import encode
from tests.support.net import wait_for
from tests.support.services import Client, GatewayCloud, start_agent
from tests.support.triton import run_triton

T = 0.5  # the card's score_threshold
FLOOR = 0.1
CLOUD_PRE = {"input": "image", "frames": "frames", "color": "gray", "size": [16, 16]}


def frame(seed: int, top: int = 255) -> np.ndarray:
    """uint8 [16, 16, 1]: a 4x4 grid of flat cells of random levels in [0, top]: each cell's score
    spans the thresholds, and PNG keeps the pixels exact."""
    levels = np.random.default_rng(seed).integers(0, top + 1, (4, 4))
    return np.kron(levels, np.ones((4, 4), dtype=np.int64)).astype(np.uint8)[..., None]


def png_frames(seeds, top: int = 255) -> list[bytes]:
    return [encode(frame(s, top), "PNG") for s in seeds]


def tensor(data: list[bytes]) -> np.ndarray:
    spec = Preprocess.model_validate(CLOUD_PRE)
    return decode_frames(np.array(data, dtype=np.object_), spec, "FP32").tensor


def above(outputs: dict[str, np.ndarray], row: int) -> list[tuple[int, float, list[float]]]:
    """The model's boxes of ``row`` scoring >= T: (class, score, box), best first."""
    scores = outputs["scores"][row]
    found = [k for k in np.argsort(-scores, kind="stable") if scores[k] >= T]
    return [(int(outputs["classes"][row, k]), float(scores[k]), outputs["boxes"][row, k].tolist())
            for k in found]


def offline_confidence(policy: str, scores: np.ndarray) -> np.ndarray:
    """The issue's definitions, row by row."""
    out = []
    for row in scores.astype(np.float64):
        if policy == "box_mean":
            found = row[row >= T]
            out.append(found.mean() if found.size else 1.0)
        else:
            candidates = row[row >= FLOOR]
            out.append(1.0 - (candidates < T).mean() if candidates.size else 1.0)
    return np.array(out)


@pytest.fixture
def detectors(tmp_path):
    edge = grid_detector(tmp_path / "edge.onnx", card=detection_card(score_threshold=T))
    cloud = grid_detector(tmp_path / "cloud.onnx", gain=1.2, bias=0.05)  # surer, other boxes
    return edge, cloud


def frames_cloud(tmp_path, model, name: str = "line") -> GatewayCloud:
    cloud = GatewayCloud(tmp_path / "cloud", model, name)
    card = cloud.repository / name / "1" / "model.onnx.card.json"
    card.write_text(json.dumps({"name": name, "preprocess": CLOUD_PRE}))
    return cloud.start()


TRITON_DETECT = """
import base64
meta = client.get_model_metadata("line", as_json=True)
wanted = [grpcclient.InferRequestedOutput(n) for n in
          ("edgecloud.detections", "edgecloud.confidence", "edgecloud.source", "scores")]
out = {"outputs": [o["name"] for o in meta["outputs"]], "answers": []}
for batch in ARGS["batches"]:
    data = np.array([base64.b64decode(b) for b in batch], dtype=np.object_)
    inp = grpcclient.InferInput("frames", [len(batch)], "BYTES")
    inp.set_data_from_numpy(data)
    r = client.infer("line", [inp], outputs=wanted)
    params = r.get_response().parameters
    out["answers"].append({
        "detections": [d.decode() for d in r.as_numpy("edgecloud.detections").reshape(-1)],
        "confidence": r.as_numpy("edgecloud.confidence").tolist(),
        "source": [s.decode() for s in r.as_numpy("edgecloud.source").reshape(-1)],
        "scores": r.as_numpy("scores").tolist(),
        "label": params["edgecloud.label"].string_param,
        "outputs": [o.name for o in r.get_response().outputs]})
emit(out)
"""


@pytest.mark.parametrize("policy, threshold", [("box_mean", 0.86), ("box_low_share", 0.7)])
def test_per_frame_decisions_and_boxes_match_an_offline_computation(tmp_path, detectors, policy, threshold):
    """Each frame's confidence is the policy's value on the model's scores; the frames below the
    threshold are answered by the cloud, whose boxes replace the edge's; the detections are the
    boxes >= the score threshold, best first, labelled from the card; the label is the top box's."""
    edge, cloud_model = detectors
    data = png_frames(range(60))
    batches = [data[i:i + 6] for i in range(0, len(data), 6)]
    cloud = frames_cloud(tmp_path, cloud_model)
    try:
        with start_agent(tmp_path / "edge", edge, cloud.port,
                         cascade={"policy": policy, "threshold": threshold, "box_floor": FLOOR,
                                  "empty_audit_rate": 0.0},
                         cloud={"max_per_s": 100000}) as agent:
            out = run_triton(TRITON_DETECT, url=f"127.0.0.1:{agent.port}",
                             batches=[[base64.b64encode(b).decode() for b in batch] for batch in batches])
    finally:
        cloud.stop()
    assert out["outputs"][-1] == DETECTIONS
    x = tensor(data)
    edge_out, cloud_out = run_detector(edge, x), run_detector(cloud_model, x)
    want = offline_confidence(policy, edge_out["scores"])
    answers = out["answers"]
    got = np.concatenate([a["confidence"] for a in answers])
    np.testing.assert_allclose(got, want, atol=1e-5)
    sources = [s for a in answers for s in a["source"]]
    decided = np.abs(want - threshold) > 1e-3
    assert decided.sum() > 40
    for row in np.flatnonzero(decided):
        assert sources[row] == ("cloud" if want[row] < threshold else "edge"), row
    assert {"cloud", "edge"} <= set(sources)
    detections = [json.loads(d) for a in answers for d in a["detections"]]
    for row, (frame_boxes, source) in enumerate(zip(detections, sources)):
        expected = above(cloud_out if source == "cloud" else edge_out, row)
        assert [d["label"] for d in frame_boxes] == [LABELS[c] for c, _, _ in expected]
        np.testing.assert_allclose([d["score"] for d in frame_boxes], [s for _, s, _ in expected], atol=1e-5)
        np.testing.assert_allclose(np.array([d["box"] for d in frame_boxes]).reshape(-1, 4),
                                   np.array([b for _, _, b in expected]).reshape(-1, 4), atol=1e-4)
        assert all(set(d) == {"label", "score", "box"} for d in frame_boxes)
    for i, answer in enumerate(answers):
        first = detections[6 * i]
        assert answer["label"] == (first[0]["label"] if first else "none")
        # the raw scores asked for by name are the merged ones too
        merged = [cloud_out if s == "cloud" else edge_out for s in answer["source"]]
        np.testing.assert_allclose(answer["scores"], [m["scores"][6 * i + j] for j, m in enumerate(merged)],
                                   atol=1e-5)
        assert answer["outputs"] == ["edgecloud.detections", "edgecloud.confidence", "edgecloud.source",
                                     "scores"]


def test_detections_come_only_when_asked_for_and_an_empty_frame_is_labelled_none(tmp_path, detectors):
    edge, _ = detectors
    dark = png_frames([1], top=60)  # every cell scores < T
    with start_agent(tmp_path / "edge", edge) as agent:
        client = Client(agent.port)
        plain = client.infer("line", {"frames": np.array(dark, dtype=np.object_)})
        asked = client.infer("line", {"frames": np.array(dark, dtype=np.object_)},
                             outputs=(DETECTIONS,))
    assert set(plain.outputs) == {"boxes", "scores", "classes"}
    assert plain.parameters[AgentResponse.LABEL] == "none"
    assert plain.parameters[AgentResponse.CONFIDENCE] == 1.0
    assert json.loads(asked.outputs[DETECTIONS][0]) == []


def test_empty_frames_are_audited_at_the_configured_share(tmp_path, detectors):
    """Frames with no box >= T never escalate by score; a share of them goes to the cloud in the
    background, tagged empty_frame; frames with boxes are never sent as empty (nor audited at all
    here: ``audit_rate`` 0)."""
    edge, cloud_model = detectors
    share, requests, per_request = 0.25, 4, 200
    dark = png_frames(range(per_request - 20), top=60)
    lit = png_frames(range(1000, 1020), top=255)
    lit = [b for b in lit if run_detector(edge, tensor([b]))["scores"].max() >= T]
    batch = np.array(dark + lit, dtype=np.object_)
    cloud = frames_cloud(tmp_path, cloud_model)
    try:
        with start_agent(tmp_path / "edge", edge, cloud.port,
                         cascade={"threshold": 0.0, "empty_audit_rate": share, "audit_rate": 0.0},
                         cloud={"max_per_s": 100000}) as agent:
            client = Client(agent.port)
            for _ in range(requests):
                r = client.infer("line", {"frames": batch})
                assert r.parameters[AgentResponse.SOURCE] == "edge"
            stats = agent.unit("line").stats
            wait_for(lambda: stats.audited == requests, timeout=30)
            scrape = Scrape(agent.metrics.port)
        stored = cloud.stored()
    finally:
        cloud.stop()
    assert stored and {e.reason for e in stored} == {"empty_frame"}
    # counted as audits, each compared with the cloud's boxes: a dark frame it also finds empty agrees
    audited = {agree: scrape.value("edgecloud_agreement_rows_total", model="line", reason="audit",
                                   agree=agree) for agree in ("true", "false")}
    assert audited["true"] + audited["false"] == len(stored)
    cloud_empty = sum(e.cloud_outputs["scores"].max() < T for e in stored)
    assert audited["true"] == cloud_empty
    assert all(e.row < len(dark) for e in stored), "a frame with a box is not an empty frame"
    assert all(e.edge_prediction is None for e in stored)
    n = requests * len(dark)
    sd = (n * share * (1 - share)) ** 0.5
    assert abs(len(stored) - n * share) < 5 * sd, (len(stored), n * share)


@pytest.mark.parametrize("other", [{"grid": 2}, {"outputs": ("bbox", "scores", "classes")}],
                         ids=["another_k", "other_names"])
def test_a_cloud_detector_of_another_contract_is_refused_and_the_edge_serves_on(tmp_path, detectors, other):
    edge, _ = detectors
    wrong = grid_detector(tmp_path / "wrong.onnx", gain=1.2, **other)
    data = png_frames(range(5))
    cloud = frames_cloud(tmp_path, wrong)
    try:
        with start_agent(tmp_path / "edge", edge, cloud.port, cascade={"threshold": 1.0},
                         cloud={"max_per_s": 100000}) as agent:
            client = Client(agent.port)
            answers = [client.infer("line", {"frames": np.array([b], dtype=np.object_)},
                                    outputs=(DETECTIONS, "scores")) for b in data]
    finally:
        cloud.stop()
    edge_out = run_detector(edge, tensor(data))
    for row, r in enumerate(answers):
        assert r.parameters[AgentResponse.SOURCE] == "edge"
        assert r.parameters[AgentResponse.DEGRADED] is True
        np.testing.assert_allclose(r.outputs["scores"][0], edge_out["scores"][row], atol=1e-6)
        boxes = json.loads(r.outputs[DETECTIONS][0])
        assert [d["label"] for d in boxes] == [LABELS[c] for c, _, _ in above(edge_out, row)]


def test_the_export_of_escalated_frames_is_a_coco_detection_set(tmp_path, detectors):
    """The store keeps the cloud's boxes with each escalated frame; the export writes the frames as
    images and the boxes >= T, in the frames' own pixels, as COCO [x, y, w, h] with the labels."""
    edge, cloud_model = detectors
    big = [np.kron(frame(s), np.ones((3, 4, 1), dtype=np.uint8)) for s in range(6)]  # 48 x 64
    data = [encode(p, "PNG") for p in big]
    cloud = GatewayCloud(tmp_path / "cloud", cloud_model, "line")
    card = cloud.repository / "line" / "1" / "model.onnx.card.json"
    card.write_text(json.dumps({**detection_card(score_threshold=T), "preprocess": CLOUD_PRE}))
    cloud.start()
    try:
        with start_agent(tmp_path / "edge", edge, cloud.port, cloud={"max_per_s": 100000}) as agent:
            r = Client(agent.port).infer("line", {"frames": np.array(data, dtype=np.object_)},
                                         escalate="always")
        assert r.parameters[AgentResponse.SOURCE] == "cloud"
    finally:
        cloud.stop()
    out = tmp_path / "set.npz"
    assert cli.main(["examples", "export", "--store", str(cloud.store_path), "--out", str(out),
                     "--detection-card", str(card)]) == 0
    folder = tmp_path / "set.frames"
    coco = json.loads((folder / "coco.json").read_text())
    assert coco["categories"] == [{"id": i + 1, "name": name} for i, name in enumerate(LABELS)]
    assert [(im["width"], im["height"]) for im in coco["images"]] == [(64, 48)] * len(data)
    cloud_out = run_detector(cloud_model, tensor(data))
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for image in coco["images"]:
        assert (folder / image["file_name"]).read_bytes() in data
        row = data.index((folder / image["file_name"]).read_bytes())
        expected = sorted((c, x1 * 4, y1 * 3, (x2 - x1) * 4, (y2 - y1) * 3)
                          for c, _, (x1, y1, x2, y2) in above(cloud_out, row))
        got = sorted((a["category_id"] - 1, *a["bbox"]) for a in by_image.get(image["id"], []))
        assert [g[0] for g in got] == [e[0] for e in expected]
        np.testing.assert_allclose(np.array(got, dtype=float).reshape(-1, 5),
                                   np.array(expected, dtype=float).reshape(-1, 5), atol=2e-3)
    assert len(coco["annotations"]) == sum(len(above(cloud_out, i)) for i in range(len(data))) > 0


def test_a_cloud_detector_taking_frames_another_way_answers_in_the_edges_pixels(tmp_path, detectors):
    """The cloud takes frames letterboxed at 32 x 32, the edge stretched at 16 x 16: an escalated
    frame's boxes are the cloud's, in the edge's input pixels (through the frame's own), as a
    confident frame's are."""
    edge, _ = detectors
    cloud_model = grid_detector(tmp_path / "cloud32.onnx", size=(32, 32), gain=1.2, bias=0.05)
    cloud_pre = {**CLOUD_PRE, "size": [32, 32], "resize": "letterbox"}
    data = [encode(np.kron(frame(s), np.ones((3, 4, 1), dtype=np.uint8)), "PNG") for s in range(6)]  # 48 x 64
    cloud = GatewayCloud(tmp_path / "cloud", cloud_model, "line")
    card = cloud.repository / "line" / "1" / "model.onnx.card.json"
    card.write_text(json.dumps({"name": "line", "preprocess": cloud_pre}))
    cloud.start()
    try:
        with start_agent(tmp_path / "edge", edge, cloud.port, cloud={"max_per_s": 100000}) as agent:
            r = Client(agent.port).infer("line", {"frames": np.array(data, dtype=np.object_)},
                                         escalate="always")
    finally:
        cloud.stop()
    assert r.parameters[AgentResponse.SOURCE] == "cloud"
    x = decode_frames(np.array(data, dtype=np.object_), Preprocess.model_validate(cloud_pre), "FP32").tensor
    cloud_out = run_detector(cloud_model, x)
    np.testing.assert_allclose(r.outputs["scores"], cloud_out["scores"], atol=1e-5)
    # letterboxed, a 64 x 48 frame is 32 x 24 at (0, 4) of the cloud's input: frame x = 2 x, frame
    # y = 2 (y - 4), inside 0..48; stretched to 16 x 16, the edge's x is the frame's / 4, its y / 3
    cloud_boxes = cloud_out["boxes"].astype(np.float64)
    want = np.stack([cloud_boxes[..., 0] / 2, np.clip((cloud_boxes[..., 1] - 4) * 2, 0, 48) / 3,
                     cloud_boxes[..., 2] / 2, np.clip((cloud_boxes[..., 3] - 4) * 2, 0, 48) / 3], axis=-1)
    real = cloud_out["scores"] > 0
    assert real.sum() > 50
    np.testing.assert_allclose(r.outputs["boxes"][real], want[real], atol=1e-4)


def test_a_detection_card_picks_box_mean_and_a_release_keeps_the_detection_outputs(tmp_path, detectors):
    """A detection card's default policy reads its scores; a model swapped in without a card (as a
    release brings it) is still served as the detector; a card naming an output the model lacks is a
    load error naming the key."""
    edge, _ = detectors
    bare = grid_detector(tmp_path / "release" / "line.onnx", gain=1.3)  # no card beside it
    bad = grid_detector(tmp_path / "bad.onnx", card=detection_card(outputs=("bbox", "scores", "classes")))
    data = np.array(png_frames([3]), dtype=np.object_)
    with start_agent(tmp_path / "edge", edge) as agent:
        settings = agent.primary.slot.model.settings
        assert (settings.policy_name, settings.score_output) == ("box_mean", "scores")
        agent.primary.slot.swap(load_edge_model(agent.config, bare, version="2", release={"labels": LABELS}))
        after = Client(agent.port).infer("line", {"frames": data}, outputs=(DETECTIONS,))
        with pytest.raises(ModelLoadError, match=r"detection\.boxes: 'bbox' is not an output"):
            load_edge_model(agent.config, bad)
    assert after.model_version == "2"
    want = above(run_detector(bare, tensor(list(data))), 0)
    assert [d["label"] for d in json.loads(after.outputs[DETECTIONS][0])] == [LABELS[c] for c, _, _ in want]


def cell_agreement(edge: dict[str, np.ndarray], cloud: dict[str, np.ndarray], row: int) -> bool | None:
    """Whether a grid detector's frame agrees between two detectors, worked out cell by cell: the boxes
    of different cells never overlap, so each box can only match the other side's box of its own cell
    (the same cell, shrunk by its score on each side: concentric squares). None for a frame with a
    score or an IoU within 1e-3 of its threshold, which float noise could tip either way."""
    agree = True
    for k in range(edge["scores"].shape[1]):
        e, c = edge["scores"][row, k], cloud["scores"][row, k]
        sides = [out["boxes"][row, k, 2] - out["boxes"][row, k, 0] for out in (edge, cloud)]
        iou = (min(sides) / max(sides)) ** 2
        if min(abs(e - T), abs(c - T)) < 1e-3 or (e >= T and c >= T and abs(iou - 0.5) < 1e-3):
            return None
        same_class = edge["classes"][row, k] == cloud["classes"][row, k]
        if (e >= T) != (c >= T) or (e >= T and not (same_class and iou >= 0.5)):
            agree = False
    return agree


def test_escalated_frames_agree_when_their_boxes_match_box_for_box(tmp_path, detectors):
    """Agreement of a detector (docs/design.md §12), counted by the agent on the frames the cloud
    answered: the edge's boxes (not the cloud's merged in their place) against the cloud's, same label
    and IoU >= 0.5, none left over on either side."""
    edge, cloud_model = detectors
    candidates = png_frames(range(200))
    edge_out, cloud_out = (run_detector(model, tensor(candidates)) for model in (edge, cloud_model))
    calls = [(data, verdict) for row, data in enumerate(candidates)
             if (verdict := cell_agreement(edge_out, cloud_out, row)) is not None][:40]
    expected = sum(verdict for _, verdict in calls)
    assert len(calls) == 40 and 0 < expected < 40, "the frames must both agree and disagree"
    cloud = frames_cloud(tmp_path, cloud_model)
    try:
        with start_agent(tmp_path / "edge", edge, cloud.port, cloud={"max_per_s": 100000},
                         cascade={"audit_rate": 0.0, "empty_audit_rate": 0.0}) as agent, \
                Client(agent.port) as client:
            for i in range(0, 40, 8):
                batch = np.array([data for data, _ in calls[i:i + 8]], dtype=np.object_)
                assert client.infer("line", {"frames": batch}, escalate="always").parameters[
                    AgentResponse.SOURCE] == "cloud"
            scrape = Scrape(agent.metrics.port)
    finally:
        cloud.stop()
    counted = {agree: scrape.value("edgecloud_agreement_rows_total", model="line", version="1",
                                   reason="escalated", agree=agree) for agree in ("true", "false")}
    assert counted == {"true": expected, "false": 40 - expected}
