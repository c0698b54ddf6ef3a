"""Camera frames in, labels out (docs/design.md §10): encoded frames through tritonclient, the original
frame escalated and stored, background escalation, still streams, and bad frames refused by row."""

from __future__ import annotations

import base64
import csv
import resource

import grpc
import numpy as np
import pytest

from cloud_gateway.hard_examples import LABELS_FILE, write_training_set
from edge_agent.serving.slot import load_edge_model
from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.confidence import calibrated_probabilities
from edgecloud.errors import InvalidInput
from edgecloud.preprocess import Preprocess, decode_frames
from edgecloud.protocol.codec import tensor_to_raw
from edgecloud.protocol.parameters import AgentResponse
from tests.support.fleet import Scrape
from tests.support.frames import cloud_answer, cloud_tensor, frames_cloud
from tests.support.images import JPEG_TOLERANCE, encode, gif, png_header, scene, tensor_of
from tests.support.net import wait_for
from tests.support.onnx_models import image_classifier, reference_logits
from tests.support.proxy import HeldProxy
from tests.support.services import Client, GatewayCloud, start_agent
from tests.support.triton import run_triton

LABELS = ["ok", "scratch", "spot", "crack"]
EDGE_PRE = {"input": "image", "frames": "frames", "color": "gray", "size": [16, 16]}
#: every row wants the cloud, and the rate limit never holds one back
ESCALATING = {"cascade": {"threshold": 1.0}, "cloud": {"max_per_s": 100000}}
SIZES = [(16, 16), (48, 64), (480, 640), (31, 17)]


@pytest.fixture
def models(tmp_path):
    edge = image_classifier(tmp_path / "edge.onnx", seed=0, card={
        "name": "cam", "version": 1, "labels": LABELS, "preprocess": EDGE_PRE})
    cloud = image_classifier(tmp_path / "cloud.onnx", size=(24, 24), seed=1, echo=True)  # shows what it saw
    return edge, cloud


TRITON_FRAMES = """
import base64
meta = client.get_model_metadata("cam", as_json=True)
out = {"inputs": [[i["name"], i["datatype"], [int(d) for d in i["shape"]]] for i in meta["inputs"]]}
wanted = [grpcclient.InferRequestedOutput("logits"), grpcclient.InferRequestedOutput("edgecloud.confidence")]

def ask(name, datatype, array):
    inp = grpcclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    try:
        r = client.infer("cam", [inp], outputs=wanted, parameters={"edgecloud.escalate": "never"})
    except InferenceServerException as e:
        return {"status": e.status(), "message": e.message()}
    params = r.get_response().parameters
    return {"logits": r.as_numpy("logits").tolist(),
            "confidence": r.as_numpy("edgecloud.confidence").tolist(),
            "label": params["edgecloud.label"].string_param}

def frames(items):
    return np.array([base64.b64decode(b) for b in items], dtype=np.object_)

out["frames"] = [ask("frames", "BYTES", frames([b])) for b in ARGS["frames"]]
out["tensors"] = [ask("image", "FP32", np.array(t, dtype=np.float32)) for t in ARGS["tensors"]]
out["bad"] = [ask("frames", "BYTES", frames(batch)) for batch in ARGS["bad"]]
out["after"] = ask("frames", "BYTES", frames(ARGS["frames"][:1]))
emit(out)
"""


def test_tritonclient_frames_match_the_tensor_path_and_bad_frames_are_refused_by_row(tmp_path, models):
    """Labels and confidences of JPEG and PNG frames of several sizes equal those of the tensors a local
    app makes from the same pixels: exactly for PNG, within the JPEG tolerance for JPEG."""
    edge, _ = models
    pixels = [scene(i, *size) for i, size in enumerate(SIZES)]
    encoded = [(encode(p, fmt), fmt) for p in pixels for fmt in ("PNG", "JPEG")]
    tensors = [tensor_of(p, (16, 16)) for p in pixels for _ in ("PNG", "JPEG")]
    ok = encode(pixels[1], "JPEG")
    bad = [[ok, ok[: len(ok) // 2]], [ok, b""], [ok, png_header(50_000, 50_000)], [ok, gif(pixels[0])]]
    b64 = [[base64.b64encode(b).decode() for b in batch] for batch in bad]
    # a value off by t moves a logit by at most t * sum(|W|) over that logit's column
    weights = reference_logits(edge, np.eye(256)) - reference_logits(edge, np.zeros((1, 256)))
    jpeg_logits = JPEG_TOLERANCE * float(np.abs(weights).sum(axis=0).max())
    with start_agent(tmp_path / "edge", edge) as agent:
        out = run_triton(TRITON_FRAMES, url=f"127.0.0.1:{agent.port}",
                         frames=[base64.b64encode(b).decode() for b, _ in encoded],
                         tensors=[t.tolist() for t in tensors], bad=b64)
    assert out["inputs"] == [["image", "FP32", [-1, 1, 16, 16]], ["frames", "BYTES", [-1]]]
    for (_, fmt), by_frame, by_tensor, tensor in zip(encoded, out["frames"], out["tensors"], tensors):
        want = reference_logits(edge, tensor.reshape(1, -1))
        np.testing.assert_allclose(by_tensor["logits"], want, rtol=1e-4, atol=1e-4)
        tolerance = 1e-4 if fmt == "PNG" else jpeg_logits
        np.testing.assert_allclose(by_frame["logits"], by_tensor["logits"], atol=tolerance)
        np.testing.assert_allclose(by_frame["confidence"], by_tensor["confidence"], atol=tolerance)
        if fmt == "PNG" or np.ptp(np.sort(want[0])[-2:]) > 2 * tolerance:
            assert by_frame["label"] == by_tensor["label"] == LABELS[int(want.argmax())]
    for refused in out["bad"]:
        assert refused["status"] == "StatusCode.INVALID_ARGUMENT"
        assert "frame row 1" in refused["message"]
    assert "label" in out["after"], "the agent keeps serving after bad frames"


def test_malformed_frame_requests_and_memory_stay_bounded(tmp_path, models):
    edge, _ = models
    ok = encode(scene(9, 48, 64), "JPEG")
    with start_agent(tmp_path / "edge", edge) as agent:
        client = Client(agent.port)

        def refused(inputs) -> str:
            with pytest.raises(grpc.RpcError) as caught:
                client.infer("cam", inputs)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return caught.value.details()

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert "frame row 2" in refused({"frames": np.array([ok, ok, png_header(50_000, 50_000)],
                                                            dtype=np.object_)})
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB; 2.5 GB unbounded
        assert "2 dimensions, expected 1" in refused({"frames": np.array([[ok], [ok]], dtype=np.object_)})
        assert "unknown input" in refused({"frames": np.array([ok], dtype=np.object_),
                                           "image": np.zeros((1, 1, 16, 16), np.float32)})
        # a wrong row count: the shape says 3 frames, the bytes hold 2
        msg = pb.ModelInferRequest(model_name="cam")
        msg.inputs.add(name="frames", datatype="BYTES", shape=[3])
        msg.raw_input_contents.append(tensor_to_raw(np.array([ok, ok], dtype=np.object_))[1])
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.ModelInfer(msg, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "BYTES element" in caught.value.details()
        served = client.infer("cam", {"frames": np.array([ok], dtype=np.object_)})
        assert served.outputs["logits"].shape == (1, 4)
    with pytest.raises(InvalidInput, match="frame row 0: empty"):
        decode_frames(np.array([b""], dtype=np.object_), Preprocess.model_validate(EDGE_PRE), "FP32")


@pytest.mark.parametrize("source", ["card", "config"])
def test_escalated_frames_reach_the_gateway_as_sent_and_are_stored_as_frames(tmp_path, models, source):
    edge, cloud_model = models
    data = [encode(scene(20, 480, 640), "JPEG"), encode(scene(21, 48, 64), "PNG"),
            encode(scene(22, 80, 100), "JPEG")]
    want = cloud_answer(cloud_model, data)
    cloud = frames_cloud(tmp_path, cloud_model, source)
    try:
        with start_agent(tmp_path / "edge", edge, cloud.port, **ESCALATING) as agent:
            client = Client(agent.port)
            assert client.metadata("cam").inputs[-1].name == "frames"
            r = client.infer("cam", {"frames": np.array(data, dtype=np.object_)}, escalate="always",
                             request_id="cam-1")
            sent = agent.primary.cascade.stats.upstream_bytes
            # a tensor request cannot escalate to a cloud whose tensor input differs: refused per call
            x = tensor_of(scene(23, 16, 16), (16, 16))
            tensor = client.infer("cam", {"image": x}, escalate="always")
            again = client.infer("cam", {"frames": np.array(data[:1], dtype=np.object_)}, escalate="always",
                                 request_id="cam-2")
            assert agent.primary.spool.depth() == 0
        stored = sorted(cloud.stored(), key=lambda e: (e.request_id, e.row))
    finally:
        cloud.stop()
    assert r.parameters[AgentResponse.SOURCE] == "cloud"
    np.testing.assert_allclose(r.outputs["logits"], want, rtol=1e-4, atol=1e-4)
    assert sent == sum(len(d) for d in data)
    assert tensor.parameters[AgentResponse.DEGRADED] is True
    np.testing.assert_allclose(tensor.outputs["logits"], reference_logits(edge, x.reshape(1, -1)), atol=1e-4)
    assert again.parameters[AgentResponse.SOURCE] == "cloud"
    assert [(e.request_id, e.row) for e in stored] == [("cam-1", 0), ("cam-1", 1), ("cam-1", 2), ("cam-2", 0)]
    for example, frame, logits in zip(stored, data, want):
        assert bytes(np.asarray(example.inputs["frames"]).reshape(-1)[0]) == frame
        assert set(example.inputs) == {"frames"}
        np.testing.assert_allclose(example.cloud_outputs["logits"], logits, rtol=1e-4, atol=1e-4)
    # what the cloud model was given: the frames through its own preprocess, at its own size
    seen = np.stack([e.cloud_outputs["seen"] for e in stored[:3]])
    assert seen.shape == (3, 1, 24, 24)
    np.testing.assert_allclose(seen, cloud_tensor(data), atol=1e-6)

    out = tmp_path / "train.npz"
    assert write_training_set(stored, out) == 4
    folder = tmp_path / "train.frames"
    table = list(csv.DictReader((folder / LABELS_FILE).open()))
    assert [row["request_id"] for row in table] == ["cam-1", "cam-1", "cam-1", "cam-2"]
    for row, frame, logits in zip(table, [*data, data[0]], [*want, want[0]]):
        assert (folder / row["frames"]).read_bytes() == frame
        assert row["frames"].endswith(".png" if frame.startswith(b"\x89PNG") else ".jpg")
        assert int(row["cloud_prediction"]) == int(np.argmax(logits))
    assert np.load(out)["frames"].tolist() == [row["frames"] for row in table]


def test_background_escalation_answers_before_the_cloud_and_the_row_is_stored(tmp_path, models):
    edge, cloud_model = models
    data = np.array([encode(scene(30, 48, 64), "JPEG")], dtype=np.object_)
    cloud = frames_cloud(tmp_path, cloud_model)
    proxy = HeldProxy(cloud.port)
    settings = {**ESCALATING, "cascade": {"threshold": 1.0, "escalate": "background"}}
    try:
        with start_agent(tmp_path / "edge", edge, proxy.port, **settings) as agent:
            client = Client(agent.port)
            by_request = client.infer("cam", {"frames": data}, escalate="background", request_id="bg-1")
            assert proxy.arrived.acquire(timeout=20), "the background escalation never left"
            by_default = client.infer("cam", {"frames": data}, request_id="bg-2")  # the model's default
            assert proxy.arrived.acquire(timeout=20)
            assert cloud.stored() == [], "the cloud has not answered yet"
            waited = agent.primary.cascade.stats.snapshot()["latency_buckets"]
            proxy.let_go.set()
            assert wait_for(lambda: len(cloud.stored()) == 2, timeout=20)
    finally:
        proxy.close()
        cloud.stop()
    edge_logits = reference_logits(edge, decode_frames(data, Preprocess.model_validate(EDGE_PRE),
                                                       "FP32").tensor.reshape(1, -1))
    for r in (by_request, by_default):
        p = r.parameters
        assert p[AgentResponse.SOURCE] == "edge" and p[AgentResponse.ESCALATED] is True
        assert p[AgentResponse.DEGRADED] is False and p[AgentResponse.ESCALATED_ROWS] == 0
        np.testing.assert_allclose(r.outputs["logits"], edge_logits, rtol=1e-4, atol=1e-4)
    # none waited for the cloud (the buckets are cumulative: the last holds every call)
    assert waited["edge"]["counts"][-1] == 2 and waited["escalated"]["counts"][-1] == 0
    stored = cloud.stored()
    assert {e.request_id for e in stored} == {"bg-1", "bg-2"}
    assert {e.reason for e in stored} == {"low_confidence"}
    np.testing.assert_allclose(stored[0].cloud_outputs["logits"], cloud_answer(cloud_model, [data[0]])[0],
                               rtol=1e-4, atol=1e-4)


def test_a_still_stream_escalates_once_per_window_and_streams_are_independent(tmp_path, models):
    edge, cloud_model = models
    still = scene(40, 120, 160)
    noisy = np.clip(still.astype(int) + np.random.default_rng(0).integers(-2, 3, still.shape), 0, 255)
    same = [encode(still, "JPEG"), encode(noisy.astype(np.uint8), "JPEG"), encode(still, "PNG")]
    changed = encode(scene(41, 120, 160), "JPEG")
    cloud = frames_cloud(tmp_path, cloud_model)
    try:
        with start_agent(tmp_path / "edge", edge, cloud.port, **ESCALATING) as agent:
            client = Client(agent.port)

            def ask(frame: bytes, stream: str):
                return client.infer("cam", {"frames": np.array([frame], dtype=np.object_)}, stream=stream)

            a = [ask(frame, "line-1/cam-a") for frame in same]
            moved = ask(changed, "line-1/cam-a")
            b = ask(same[0], "line-1/cam-b")
            plain = client.infer("cam", {"frames": np.array([same[0]], dtype=np.object_)})  # no stream
            metrics = Scrape(agent.metrics.port)
            counters = agent.primary.cascade.stats.snapshot()["counters"]
        stored = cloud.stored()
    finally:
        cloud.stop()
    first = a[0].parameters
    assert first[AgentResponse.ESCALATED] is True and first[AgentResponse.REUSED] is False
    for r in a[1:]:
        p = r.parameters
        assert p[AgentResponse.REUSED] is True and p[AgentResponse.SOURCE] == "cloud"
        assert p[AgentResponse.ESCALATED] is False
        np.testing.assert_array_equal(r.outputs["logits"], a[0].outputs["logits"])
    for r in (moved, b):
        assert r.parameters[AgentResponse.ESCALATED] is True and r.parameters[AgentResponse.REUSED] is False
    np.testing.assert_allclose(moved.outputs["logits"], cloud_answer(cloud_model, [changed]), rtol=1e-4,
                               atol=1e-4)
    assert plain.parameters[AgentResponse.REUSED] is False  # no stream named: nothing to reuse
    assert plain.parameters[AgentResponse.ESCALATED] is True
    assert len(stored) == 4  # a[0], moved, b, plain: the still frames were not sent again
    assert counters["reused"] == 2 and metrics.value("edgecloud_reused_rows_total") == 2
    assert metrics.value("edgecloud_upstream_bytes_total") == counters["upstream_bytes"] > 0


def test_a_confident_still_frame_is_answered_by_the_edge_not_the_stream(tmp_path, models):
    """Reuse replaces escalations only: a row the edge is sure of keeps the edge's answer."""
    edge, cloud_model = models
    frame = encode(scene(50, 32, 32), "PNG")
    spec = Preprocess.model_validate(EDGE_PRE)
    logits = reference_logits(edge, decode_frames(np.array([frame], dtype=np.object_), spec,
                                                  "FP32").tensor.reshape(1, -1))
    confidence = float(calibrated_probabilities(logits, "logits").max())
    cloud = frames_cloud(tmp_path, cloud_model)
    try:
        with start_agent(tmp_path / "edge", edge, cloud.port, **ESCALATING) as agent:
            client = Client(agent.port)
            first = client.infer("cam", {"frames": np.array([frame], dtype=np.object_)}, stream="s")
            sure = client.infer("cam", {"frames": np.array([frame], dtype=np.object_)}, stream="s",
                                threshold=confidence / 2)
    finally:
        cloud.stop()
    assert first.parameters[AgentResponse.ESCALATED] is True
    assert sure.parameters[AgentResponse.SOURCE] == "edge" and sure.parameters[AgentResponse.REUSED] is False
    np.testing.assert_allclose(sure.outputs["logits"], logits, rtol=1e-4, atol=1e-4)


def test_a_model_swapped_in_without_a_card_keeps_the_frames_input(tmp_path, models):
    """A release travels without its card: the model it brings keeps serving the cameras."""
    edge, _ = models
    bare = image_classifier(tmp_path / "release" / "cam.onnx", seed=5)  # no card beside it
    frame = np.array([encode(scene(60, 48, 64), "JPEG")], dtype=np.object_)
    with start_agent(tmp_path / "edge", edge) as agent:
        client = Client(agent.port)
        before = client.infer("cam", {"frames": frame})
        agent.primary.slot.swap(load_edge_model(agent.config, bare, version="2"))
        after = client.infer("cam", {"frames": frame})
    spec = Preprocess.model_validate(EDGE_PRE)
    tensor = decode_frames(frame, spec, "FP32").tensor.reshape(1, -1)
    np.testing.assert_allclose(before.outputs["logits"], reference_logits(edge, tensor), rtol=1e-4, atol=1e-4)
    assert after.model_version == "2"
    np.testing.assert_allclose(after.outputs["logits"], reference_logits(bare, tensor), rtol=1e-4, atol=1e-4)


def test_a_cloud_without_frames_gets_the_edge_models_tensor(tmp_path, models):
    """A plain KServe v2 cloud (no preprocess, the edge model's input): frames escalate as the tensor."""
    edge, _ = models
    plain = image_classifier(tmp_path / "plain.onnx", seed=7)  # 16x16 like the edge model, no card
    cloud = GatewayCloud(tmp_path / "plain-cloud", plain, "cam").start()
    data = np.array([encode(scene(70, 48, 64), "JPEG")], dtype=np.object_)
    tensor = decode_frames(data, Preprocess.model_validate(EDGE_PRE), "FP32").tensor
    try:
        with start_agent(tmp_path / "edge", edge, cloud.port, **ESCALATING) as agent:
            r = Client(agent.port).infer("cam", {"frames": data}, escalate="always")
        stored = cloud.stored()
    finally:
        cloud.stop()
    assert r.parameters[AgentResponse.SOURCE] == "cloud"
    np.testing.assert_allclose(r.outputs["logits"], reference_logits(plain, tensor.reshape(1, -1)), atol=1e-4)
    assert len(stored) == 1 and set(stored[0].inputs) == {"image"}
    np.testing.assert_allclose(stored[0].inputs["image"], tensor[0], atol=1e-6)


def test_the_config_overrides_the_cards_preprocess_key_by_key(tmp_path, models):
    """``[model] preprocess`` (or a model table's) changes the keys it names and keeps the rest."""
    edge, _ = models
    frame = np.array([encode(scene(61, 48, 64), "PNG")], dtype=np.object_)
    with start_agent(tmp_path / "edge", edge, model={"preprocess": {"resize": "letterbox"}}) as agent:
        model = agent.primary.slot.model
        answer = Client(agent.port).infer("cam", {"frames": frame})
    assert model.preprocess.resize == "letterbox"
    assert (model.preprocess.color, tuple(model.preprocess.size)) == ("gray", (16, 16))  # from the card
    tensor = decode_frames(frame, Preprocess.model_validate({**EDGE_PRE, "resize": "letterbox"}),
                           "FP32").tensor.reshape(1, -1)
    np.testing.assert_allclose(answer.outputs["logits"], reference_logits(edge, tensor), rtol=1e-4, atol=1e-4)
