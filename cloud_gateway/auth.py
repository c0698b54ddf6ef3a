"""Who calls the gateway and what it may do (docs/design.md §5).

An identity is proven by a client certificate (mutual TLS: CN = its name, OU = a device's fleet)
and/or a bearer token (the tokens file: sha256 of the token, its name, optionally the fleet). When a
call carries both, they must name the same identity and no two fleets, else UNAUTHENTICATED: a
device's certificate with another device's token proves nothing. Names listed in ``auth.operators``
are operators; every other identity is a device.

- a device may infer (its hard examples are stored under its name) and download the releases
  published for its own fleet (a device with no fleet downloads none);
- an operator may also upload releases (``fleet publish``) and download any fleet's.

Everything else is PERMISSION_DENIED, with a message. Health checks stay open so that load balancers
and Kubernetes probes, which carry no credential, can watch the gateway. Only token hashes are kept on
disk and in memory, and no token is ever logged.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health

from edgecloud._generated.edgecloud.v1 import artifacts_pb2 as artifacts_pb
from edgecloud.errors import ConfigError
from edgecloud.mqtt.topics import check_id
from edgecloud.protocol.rest import RestPeer
from edgecloud.protocol.servicer import abort, bearer_token

log = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
#: method prefixes callable without a credential
OPEN_METHODS = (f"/{health.SERVICE_NAME}/",)
#: the one method only operators may call
UPLOAD_METHOD = f"/{artifacts_pb.DESCRIPTOR.services_by_name['ArtifactService'].full_name}/Upload"


def token_hash(token: str) -> str:
    """What the tokens file holds for ``token``: its sha256, lowercase hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Credential:
    """What one credential says: the identity's name and, for a device, its fleet ("" = none)."""

    name: str
    fleet: str = ""


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller the gateway authenticated."""

    name: str
    fleet: str
    operator: bool

    @property
    def role(self) -> str:
        return "operator" if self.operator else "device"


class AuthRefused(Exception):
    """A call the gateway will not serve; ``code`` is UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class TokenTable:
    """sha256(token) → credential, read from a tokens file: one ``<sha256 hex> <name> [<fleet>]`` per
    line, ``#`` comments and blank lines allowed. Make a line with
    ``printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1``, a space, the device id (or the operator's
    name) and, for a device, a space and its fleet."""

    def __init__(self, credentials: dict[str, Credential]) -> None:
        self._credentials = credentials

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"auth.tokens_file: cannot read {path}: {e.strerror}") from None
        credentials = {}
        for number, text in enumerate(lines, 1):
            fields = text.split("#", 1)[0].split()
            if not fields:
                continue
            where = f"auth.tokens_file: {path}:{number}"
            if len(fields) not in (2, 3) or not _SHA256_HEX.match(fields[0]):
                raise ConfigError(f"{where}: expected '<sha256 hex> <device id> [<fleet>]'")
            try:
                fleet = check_id("fleet", fields[2]) if len(fields) == 3 else ""
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
            credentials[fields[0]] = Credential(fields[1], fleet)
        if not credentials:
            raise ConfigError(f"auth.tokens_file: {path} holds no token")
        return cls(credentials)

    def lookup(self, token: str) -> Credential | None:
        """The credential a token stands for, or None for an unknown or empty token."""
        return self._credentials.get(token_hash(token)) if token else None


@functools.lru_cache(maxsize=4096)
def certificate_fleet(pem: bytes) -> str:
    """A device certificate's fleet: its one OU ("" with none or several)."""
    units = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(units[0].value) if len(units) == 1 else ""


class Authenticator:
    """Turns a call's credentials into an :class:`Identity`; ``mutual_tls`` when client certificates
    are required, ``tokens`` when bearer tokens are."""

    def __init__(self, tokens: TokenTable | None, mutual_tls: bool, operators: Collection[str] = ()) -> None:
        self.tokens = tokens
        self.mutual_tls = mutual_tls
        self.operators = frozenset(operators)

    def identify(self, certificate: Credential | None, token: str) -> Identity:
        """The identity ``certificate`` (from the TLS handshake) and ``token`` prove; AuthRefused
        (UNAUTHENTICATED) when a required one is missing or unknown, or the two disagree."""
        proofs = []
        if self.mutual_tls:
            if certificate is None or not certificate.name:
                raise AuthRefused(grpc.StatusCode.UNAUTHENTICATED, "the client certificate names no CN")
            proofs.append(("certificate", certificate))
        if self.tokens is not None:
            if not token:
                raise AuthRefused(grpc.StatusCode.UNAUTHENTICATED,
                                  "missing bearer token (authorization: Bearer …)")
            credential = self.tokens.lookup(token)
            if credential is None:
                raise AuthRefused(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
            proofs.append(("token", credential))
        names = {c.name for _, c in proofs}
        fleets = {c.fleet for _, c in proofs if c.fleet}
        if len(names) > 1 or len(fleets) > 1:
            said = ", ".join(f"the {kind} names {c.name}" + (f" of fleet {c.fleet}" if c.fleet else "")
                             for kind, c in proofs)
            raise AuthRefused(grpc.StatusCode.UNAUTHENTICATED,
                              f"the certificate and the token name different devices ({said})")
        name = names.pop()
        return Identity(name, fleets.pop() if fleets else "", name in self.operators)

    def of_context(self, context: grpc.ServicerContext) -> Identity:
        """The identity of a call, from its TLS peer and its metadata."""
        certificate = None
        auth = context.auth_context() or {}
        names, pems = auth.get("x509_common_name") or [], auth.get("x509_pem_cert") or []
        if names:
            certificate = Credential(names[0].decode("utf-8", "replace"),
                                     certificate_fleet(pems[0]) if pems else "")
        return self.identify(certificate, bearer_token(context.invocation_metadata()))

    def of_rest(self, peer: RestPeer) -> Identity:
        """The identity of a REST call, from its TLS peer and its ``Authorization`` header; refusals
        are logged as over gRPC."""
        certificate = (Credential(peer.common_name, certificate_fleet(peer.certificate_pem)
                                  if peer.certificate_pem else "") if peer.common_name else None)
        try:
            return self.identify(certificate, peer.bearer_token)
        except AuthRefused as e:
            log.warning("event=auth_refused method=rest code=%s reason=%r peer=%s", e.code.name, str(e),
                        peer.peer)
            raise


def may_download(identity: Identity, name: str, version: int, fleets: Collection[str]) -> None:
    """PERMISSION_DENIED unless ``identity`` may download a release published for ``fleets``."""
    if identity.operator or (identity.fleet and identity.fleet in fleets):
        return
    if not identity.fleet:
        raise AuthRefused(grpc.StatusCode.PERMISSION_DENIED,
                          f"device {identity.name} has no fleet (its certificate's OU or the third field "
                          "of its tokens file line), so no release is its own")
    raise AuthRefused(grpc.StatusCode.PERMISSION_DENIED,
                      f"{name} version {version} is not published for fleet {identity.fleet} of device "
                      f"{identity.name}")


def _guarded(handler: grpc.RpcMethodHandler,
             admit: Callable[[grpc.ServicerContext], None]) -> grpc.RpcMethodHandler:
    """``handler`` with ``admit(context)`` run before its behaviour; AuthRefused aborts the call."""
    kinds: tuple[tuple[str, Callable], ...] = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attribute, make in kinds:
        behaviour = getattr(handler, attribute)
        if behaviour is None:
            continue

        if inspect.iscoroutinefunction(behaviour):  # grpc.aio's own handlers (the gateway's ModelInfer)
            async def guarded(request, context, behaviour=behaviour):
                try:
                    admit(context)
                except AuthRefused as e:
                    await context.abort(e.code, str(e))
                return await behaviour(request, context)
        elif attribute.endswith("_stream"):  # a generator, as grpc.aio runs a sync stream's handler
            def guarded(request, context: grpc.ServicerContext, behaviour=behaviour):
                if _admitted(admit, context):
                    yield from behaviour(request, context)
        else:
            def guarded(request, context: grpc.ServicerContext, behaviour=behaviour):
                return behaviour(request, context) if _admitted(admit, context) else None

        return make(guarded, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
    raise TypeError(f"unknown handler kind: {handler!r}")


def _admitted(admit: Callable[[grpc.ServicerContext], None], context: grpc.ServicerContext) -> bool:
    """Whether ``admit`` lets the call in; a refusal ends it (and the handler must not run on)."""
    try:
        admit(context)
    except AuthRefused as e:
        abort(context, e.code, str(e))
        return False
    return True


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call but health checks that does not prove an identity, and uploads from anyone
    but an operator."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHODS):
            return handler

        def admit(context: grpc.ServicerContext) -> None:
            try:
                identity = self.authenticator.of_context(context)
                if method == UPLOAD_METHOD and not identity.operator:
                    raise AuthRefused(grpc.StatusCode.PERMISSION_DENIED,
                                      f"only an operator may upload releases; {identity.name} is a device "
                                      "(operators are listed in auth.operators)")
            except AuthRefused as e:
                log.warning("event=auth_refused method=%s code=%s reason=%r peer=%s", method, e.code.name,
                            str(e), context.peer())
                raise

        return _guarded(handler, admit)
