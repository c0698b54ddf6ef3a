"""Fuzzing the core where clients' bytes arrive: the codec, request validation against a model's
contract, requested outputs, and release envelopes and payloads. A client's mistake may only ever be
InvalidInput (a request) or ReleaseRejected (a release): never another exception, never a hang."""

from __future__ import annotations

import contextlib
import hashlib
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.errors import InvalidInput
from edgecloud.guards import FLOAT_DATATYPES, InputContract, InputGuard
from edgecloud.protocol.codec import decode_request, decode_response, encode_request, tensor_from_raw
from edgecloud.protocol.datatypes import DATATYPES, kserve_datatype
from edgecloud.protocol.outputs import select_outputs
from edgecloud.release import (
    Artifact,
    Calibration,
    Envelope,
    Reason,
    ReleasePayload,
    ReleaseRejected,
    Rollout,
    sign_release,
    verify_envelope,
)
from edgecloud.signing import TrustStore, generate_key, key_id, sign
from edgecloud.tensors import TensorSpec
from tests.support.fuzz import (
    DIMS,
    FUZZ,
    JSON_VALUES,
    SPECIAL_FLOATS,
    bytes_payload,
    infer_requests,
    mutated_payloads,
)

IMAGE = TensorSpec("image", "FP32", (-1, 1, 32, 32))
CONTRACTS = {
    "m": InputContract.build("m", (IMAGE,), [InputGuard("image", range=(0, 1))]),
    "mixed": InputContract.build("mixed", (TensorSpec("image", "BYTES", (-1,)),
                                           TensorSpec("count", "INT8", (-1, 2))), max_rows=16),
}
OUTPUTS = {"logits": np.zeros((1, 4), np.float32)}


@FUZZ
@given(st.sampled_from(sorted(CONTRACTS)), st.data())
def test_decoding_against_a_contract_refuses_or_gives_what_the_model_takes(model, data):
    contract = CONTRACTS[model]
    msg = data.draw(infer_requests(model, ("image", "count"), ("logits", "edgecloud.source"),
                                   tuple(CONTRACTS)))
    try:
        request = decode_request(msg, contract)
    except InvalidInput:
        return
    headers = {name: (kserve_datatype(a.dtype), a.shape) for name, a in request.inputs.items()}
    rows = contract.check_headers(headers)
    assert 1 <= rows <= contract.max_rows
    for spec in contract.inputs:
        if spec.datatype in FLOAT_DATATYPES:
            assert np.isfinite(request.inputs[spec.name]).all()
    again = decode_request(encode_request(request), contract)
    for name, array in request.inputs.items():
        np.testing.assert_array_equal(again.inputs[name], array)
    confidence = contract.guard_confidence(request.inputs, np.ones(rows, np.float32))
    assert confidence.shape == (rows,)
    with contextlib.suppress(InvalidInput):
        select_outputs(model, request.outputs, {"logits": np.zeros((rows, 4), np.float32)})


@FUZZ
@given(st.data())
def test_decoding_without_a_contract_refuses_or_decodes(data):
    """The spool's stored requests and the cloud's answers are decoded without a model's contract."""
    msg = data.draw(infer_requests("m", ("image",), ("logits",)))
    try:
        request = decode_request(msg)
    except InvalidInput:
        pass
    else:
        for tensor in msg.inputs:
            assert request.inputs[tensor.name].shape == tuple(tensor.shape)
    reply = pb.ModelInferResponse(model_name="m")
    reply.outputs.extend(msg.inputs)
    reply.raw_output_contents.extend(msg.raw_input_contents)
    with contextlib.suppress(InvalidInput):
        decode_response(reply)


@FUZZ
@given(st.one_of(st.sampled_from(DATATYPES), st.text(max_size=6)), st.lists(DIMS, max_size=6),
       st.binary(max_size=128))
def test_any_raw_bytes_under_any_header(datatype, shape, raw):
    try:
        array = tensor_from_raw(raw, datatype, tuple(shape), "t")
    except InvalidInput:
        return
    assert array.shape == tuple(shape)


@FUZZ
@given(st.lists(st.binary(max_size=9), max_size=8), st.integers(0, 10), st.data())
def test_bytes_prefixes_decode_exactly_or_are_refused(elements, count, data):
    exact = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    if count == len(elements):
        assert tensor_from_raw(exact, "BYTES", (count,), "s").tolist() == elements
    raw = data.draw(bytes_payload(count))
    try:
        values = tensor_from_raw(raw, "BYTES", (count,), "s")
    except InvalidInput:
        return
    assert b"".join(len(v).to_bytes(4, "little") + v for v in values) == raw


@FUZZ
@given(st.lists(SPECIAL_FLOATS, min_size=6, max_size=6), st.booleans())
def test_guards_on_special_values(values, allow):
    contract = InputContract.build("m", (TensorSpec("x", "FP32", (-1, 3)),),
                                   [InputGuard("x", allow_nonfinite=allow, range=(-1, 1))])
    x = np.array(values, dtype=np.float32).reshape(2, 3)
    try:
        contract.check_values({"x": x})
    except InvalidInput as e:
        assert not allow and not np.isfinite(x).all() and "input 'x': row" in str(e)
    confidence = contract.guard_confidence({"x": x}, np.ones(2, np.float32))
    inside = ((x >= -1) & (x <= 1)).all(axis=1)
    np.testing.assert_array_equal(confidence, np.where(inside, 1.0, 0.0).astype(np.float32))


# -- releases -----------------------------------------------------------------------------------------
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
KEY = generate_key()
TRUST = TrustStore({key_id(KEY.public_key()): KEY.public_key()})
GOOD = sign_release(ReleasePayload(
    model="inspection", version=4, publisher="ops@plant",
    artifact=Artifact(uri="grpc://gw:8001/inspection/4", sha256=hashlib.sha256(b"m").hexdigest(), size=5),
    issued_at=NOW - timedelta(hours=1), expires_at=NOW + timedelta(days=30),
    calibration=Calibration(policy="max_prob", temperature=1.3, threshold=0.7), rollout=Rollout(50.0, "r1"),
    labels=("ok", "crack")), KEY)


@FUZZ
@given(st.one_of(st.binary(max_size=64), JSON_VALUES.map(json.dumps),
                 mutated_payloads(GOOD.payload).map(lambda p: json.dumps({**GOOD.to_dict(), "payload": p}))))
def test_any_envelope_bytes_parse_or_are_malformed(data):
    try:
        envelope = Envelope.from_json(data)
    except ReleaseRejected:
        return
    with contextlib.suppress(ReleaseRejected):
        verify_envelope(envelope, TRUST, now=NOW)


@FUZZ
@given(mutated_payloads(GOOD.payload), st.sampled_from([NOW, datetime(1970, 1, 1, tzinfo=timezone.utc)]))
@example({**GOOD.payload, "issued_at": "0001-01-01T00:00:00+05:00"}, NOW)  # before year 1 in UTC
@example({**GOOD.payload, "expires_at": "9999-12-31T23:59:59Z"}, NOW)  # the skew added overflows
def test_signed_but_mutated_payloads_verify_or_are_rejected_with_a_reason(payload, now):
    """Signed by a trusted key, so the payload's own checks are reached with every kind of bad value."""
    try:
        kid, signature = sign(KEY, payload)
    except ValueError:  # no RFC 8785 form (an integer beyond 2**53): no publisher can sign it
        with pytest.raises(ReleaseRejected) as info:
            verify_envelope(Envelope(payload, GOOD.key_id, GOOD.signature), TRUST, now=now)
        assert info.value.reason is Reason.BAD_SIGNATURE
        return
    try:
        verified = verify_envelope(Envelope(payload, kid, signature), TRUST, now=now,
                                   newest_trusted_issued_at=NOW)
    except ReleaseRejected as e:
        assert e.reason.value in str(e)
        return
    assert verified == ReleasePayload.from_dict(payload)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"payload":' * 50_000])
def test_deeply_nested_json_is_malformed_not_a_crash(text):
    with pytest.raises(ReleaseRejected, match="malformed"):
        Envelope.from_json(text)
