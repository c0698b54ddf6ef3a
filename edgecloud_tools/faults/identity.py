"""Calls at a gateway with mutual TLS, bearer tokens and an operator (docs/design.md §5), by callers
who must be refused: no certificate, a certificate from another CA, a device's certificate with another
device's token, a device uploading a release, a device fetching another fleet's release. The same
calls by the right identities are answered, so a refusal is the identity's, not a broken gateway's.
Certificates are made as ``edgecloud certs`` makes them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc

from cloud_gateway.auth import token_hash
from edgecloud.artifacts import TransportTLS, download, gateway_uri, upload
from edgecloud.client import KServeClient
from edgecloud.endpoint import Endpoint
from edgecloud.files import file_sha256
from edgecloud.protocol.parameters import CloudRequest, EdgeSummary
from edgecloud.release import ReleaseRejected
from edgecloud_tools.certs import issue, make_ca
from edgecloud_tools.faults.harness import stored_rows
from edgecloud_tools.faults.plan import Faults, Outcome
from edgecloud_tools.rig import servers
from edgecloud_tools.rig.services import write_toml
from edgecloud_tools.toolchain import CLOUD_NAME

OPERATOR = "ops"
#: identity → (fleet, token)
DEVICES = {"press-1": ("fleet-a", "token-of-press-1"), "press-2": ("fleet-a", "token-of-press-2")}
OPERATOR_TOKEN = "token-of-ops"
RELEASE = "inspection-edge"


def _pki(d: Path) -> dict[str, TransportTLS]:
    """Identities by name: the operator, the devices, a stranger whose CA the gateway does not trust,
    and a client with no certificate at all."""
    make_ca(d / "ca", "faults-ca")
    issue(d / "ca", d / "server", "localhost", hosts=["127.0.0.1", "localhost"])
    ca = d / "ca" / "ca.pem"
    found = {"none": TransportTLS(ca=ca)}
    issue(d / "ca", d / OPERATOR, OPERATOR, client=True)
    for name, (fleet, _) in DEVICES.items():
        issue(d / "ca", d / name, name, client=True, org_unit=fleet)
    make_ca(d / "other-ca", "other-ca")
    issue(d / "other-ca", d / "stranger", "press-1", client=True, org_unit="fleet-a")
    for name in (OPERATOR, *DEVICES, "stranger"):
        found[name] = TransportTLS(ca=ca, cert=d / f"{name}.pem", key=d / f"{name}.key")
    return found


def _outcome(call: Callable[[], object]) -> str:
    """OK, or the status code the call was refused with."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code().name
    except ReleaseRejected as e:
        return next((code.name for code in grpc.StatusCode if code.name in e.detail), e.reason.value)
    return "OK"


def identities(f: Faults) -> Outcome:
    out = Outcome("identities", "no certificate, another CA's certificate, another device's token, a "
                  "device's upload and another fleet's release are refused; the right identities are "
                  "answered")
    d = f.dir("identities")
    pki = _pki(d / "pki")
    tokens = d / "tokens"
    lines = [f"{token_hash(token)} {name} {fleet}\n" for name, (fleet, token) in DEVICES.items()]
    tokens.write_text("".join(lines) + f"{token_hash(OPERATOR_TOKEN)} {OPERATOR}\n")
    config = write_toml(d / "gateway.toml", {
        "tls": {"cert": str(d / "pki" / "server.pem"), "key": str(d / "pki" / "server.key"),
                "client_ca": str(d / "pki" / "ca" / "ca.pem")},
        "auth": {"tokens_file": str(tokens), "operators": [OPERATOR]}})
    ops = pki[OPERATOR]

    def channel(tls: TransportTLS) -> KServeClient:
        return KServeClient("tls", channel=grpc.secure_channel(f"127.0.0.1:{gateway.port}",
                                                               tls.grpc_credentials()))

    def serving() -> bool:
        with channel(ops) as client:
            return client.serving()

    gateway = servers.gateway(d, f.models.repository, "gw", store=True, config=config, ready=serving)
    x = f.images(1)
    escalation = {CloudRequest.REQUEST_ID: "id-1", CloudRequest.DEVICE_ID: "press-1",
                  CloudRequest.EDGE_SUMMARY: EdgeSummary(rows=(0,), reason="low_confidence").to_json()}

    def infer(tls: TransportTLS, token: str | None) -> Callable[[], object]:
        def call() -> object:
            with channel(tls) as client:
                client.call_metadata = (("authorization", f"Bearer {token}"),) if token else ()
                return client.infer(CLOUD_NAME, {f.input["name"]: x}, params=escalation, timeout=10)
        return call

    release = f.models.edge
    def put(tls: TransportTLS, token: str, fleet: str, version: int) -> Callable[[], object]:
        return lambda: upload(Endpoint("127.0.0.1", gateway.port), release, name=RELEASE, version=version,
                              fleet=fleet, tls=tls, token=token, timeout_s=30)

    def fetch(tls: TransportTLS, token: str, version: int) -> Callable[[], object]:
        return lambda: download(gateway_uri(f"127.0.0.1:{gateway.port}", RELEASE, version, tls=True),
                                d / "downloads" / f"{id(tls)}-{version}.onnx", sha256=file_sha256(release),
                                size=release.stat().st_size, tls=tls, token=token, timeout_s=30)

    p1 = DEVICES["press-1"][1]
    with gateway, servers.RssSampler(gateway.proc.pid) as rss:
        allowed = {
            "operator uploads fleet-a's v1": put(ops, OPERATOR_TOKEN, "fleet-a", 1),
            "operator uploads fleet-b's v2": put(ops, OPERATOR_TOKEN, "fleet-b", 2),
            "press-1 infers with its certificate and token": infer(pki["press-1"], p1),
            "press-1 downloads its fleet's v1": fetch(pki["press-1"], p1, 1),
        }
        refused = {
            "no client certificate": (infer(pki["none"], p1), ("UNAVAILABLE", "UNAUTHENTICATED")),
            "a certificate from another CA": (infer(pki["stranger"], p1), ("UNAVAILABLE", "UNAUTHENTICATED")),
            "press-1's certificate with press-2's token": (infer(pki["press-1"], DEVICES["press-2"][1]),
                                                           ("UNAUTHENTICATED",)),
            "press-1's certificate without its token": (infer(pki["press-1"], None), ("UNAUTHENTICATED",)),
            "press-1 uploads a release": (put(pki["press-1"], p1, "fleet-a", 3), ("PERMISSION_DENIED",)),
            "press-1 downloads fleet-b's v2": (fetch(pki["press-1"], p1, 2), ("PERMISSION_DENIED",)),
        }
        answers = {what: _outcome(call) for what, call in allowed.items()}
        refusals = {what: _outcome(call) for what, (call, _) in refused.items()}
    for what, code in answers.items():
        out.check(f"{what}: answered", code == "OK", code)
    for what, code in refusals.items():
        out.check(f"{what}: refused", code in refused[what][1], code)
    devices = {device for device, _ in stored_rows(d / "gw-hard-examples.db")}
    out.check("the stored case names the certificate's device", devices == {"press-1"}, str(sorted(devices)))
    out.rss_before_bytes, out.rss_peak_bytes = rss.before, rss.peak
    out.figures["rss_of"] = "gateway"
    out.answered = sum(code == "OK" for code in answers.values())
    out.failed = len(answers) - out.answered
    out.figures.update(answered=answers, refused=refusals)
    return out
