"""An MQTT v5 client on paho-mqtt 2.x whose connection state tells the truth.

paho's threaded client reconnects by itself but hides what happens: a CONNACK that refuses us still
runs ``on_connect``, a TLS failure only shows in a debug log, ``publish`` on a dead link queues silently
and ``wait_for_publish`` returns quietly on timeout. This wrapper keeps an honest, read-only
:class:`ConnectionState` and ``last_error``, raises instead of queuing, re-subscribes and publishes the
birth message on every connect, refreshes the Last Will before every attempt, and never blocks paho's
network thread (callbacks hand over and return).
"""

from __future__ import annotations

import enum
import json
import logging
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, SecretStr, model_validator

from edgecloud.config import Section, cert_key_pair
from edgecloud.errors import EdgecloudError
from edgecloud.mqtt.payloads import Body
from edgecloud.mqtt.topics import Topic, Wildcard

log = logging.getLogger(__name__)

Payload = bytes | str | Mapping[str, Any] | Body


class MqttError(EdgecloudError):
    """Root of the MQTT errors."""


class NotConnected(MqttError):
    """The client is not connected now; nothing was queued, the caller decides to buffer or fail."""


class MqttTimeout(MqttError):
    """No connection, SUBACK or PUBACK within the given time."""


class ConnectionRefused(MqttError):
    """The broker refused us (CONNACK reason, e.g. bad user name or password) or TLS verification failed."""


class MqttTLS(Section):
    """``[mqtt.tls]``: how to trust the broker and, for mutual TLS, who we are."""

    ca: Path | None = Field(None, description="CA bundle of the broker's certificate; default: system CAs")
    cert: Path | None = Field(None, description="client certificate (mutual TLS)")
    key: Path | None = Field(None, description="client private key (mutual TLS)")

    _pair = model_validator(mode="after")(cert_key_pair)


class MqttConfig(Section):
    """``[mqtt]``: the broker and how to reach it."""

    host: str = Field("127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535)
    client_id: str = Field("", description="MQTT client id; default: edgecloud-<random>")
    username: str | None = None
    password: SecretStr | None = Field(None, description="never logged")
    tls: MqttTLS | None = Field(None, description="TLS to the broker; absent: plaintext")
    keepalive_s: int = Field(30, ge=1, le=65535, description="ping interval; the Will fires ~1.5x after")
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP + TLS + CONNACK time per attempt")
    reconnect_min_delay_s: float = Field(1.0, gt=0, description="first retry delay, doubled per failure")
    reconnect_max_delay_s: float = Field(30.0, gt=0, description="cap of the retry delay")
    session_expiry_s: int = Field(0, ge=0, description="keep subscriptions and queued QoS 1 messages on "
                                  "the broker this long across disconnects; 0: a clean session each time")

    @model_validator(mode="after")
    def _delays(self) -> MqttConfig:
        if self.reconnect_max_delay_s < self.reconnect_min_delay_s:
            raise ValueError("reconnect_max_delay_s must be >= reconnect_min_delay_s")
        return self

    @property
    def broker(self) -> str:
        return f"{self.host}:{self.port}"


class ConnectionState(enum.Enum):
    DISCONNECTED = "disconnected"  # not started, or closed
    CONNECTING = "connecting"  # an attempt is under way (TCP, TLS, CONNECT/CONNACK)
    CONNECTED = "connected"  # CONNACK accepted
    BACKING_OFF = "backing_off"  # the last attempt failed or the link dropped; paho retries after a delay


@dataclass(frozen=True, slots=True)
class Message:
    """A received message (copied out of paho's object, safe to keep)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish later: the birth, the Will, a final message on close."""

    topic: Topic
    payload: Payload
    qos: int = 1
    retain: bool = False


def encode_payload(payload: Payload) -> bytes:
    """Bytes as they are, text as UTF-8, a payload model or a mapping as compact JSON."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, Body):
        payload = payload.to_dict()
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


class _PahoNoise(logging.Filter):
    """paho 2.2 logs an ERROR on every network-loop pass without a socket (between retries, after
    close); our state changes already say that, once, with the cause."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected.")


_PAHO_LOG = logging.getLogger(f"{__name__}.paho")
_PAHO_LOG.addFilter(_PahoNoise())

def _remember(table: dict[int, Any], mid: int, value: Any, limit: int = 256) -> None:
    """Record an acknowledgement by message id; the oldest go first (nobody waited for them)."""
    table[mid] = value
    while len(table) > limit:
        table.pop(next(iter(table)))


StateListener = Callable[[ConnectionState, str], None]
MessageHandler = Callable[[Message], None]
OutgoingFactory = Callable[[], Outgoing]


class MqttClient:
    """One broker connection with its own network thread.

    ``on_message``, state listeners and the ``birth``/``will`` factories run on paho's network thread:
    they must not block (hand work to a queue). ``birth`` is called on every connect and published
    (retained, as its Outgoing says) after the subscriptions are re-made; ``will`` is called before
    every attempt, so its payload is fresh. Use as a context manager or call ``start()``/``close()``.
    """

    def __init__(self, config: MqttConfig, *, on_message: MessageHandler | None = None,
                 birth: OutgoingFactory | None = None, will: OutgoingFactory | None = None) -> None:
        self.config = config
        self.client_id = config.client_id or f"edgecloud-{uuid.uuid4().hex[:12]}"
        self._on_message_handler = on_message
        self._birth = birth
        self._will = will
        self._cond = threading.Condition()
        self._state = ConnectionState.DISCONNECTED
        self._last_error = ""
        self._refusal = ""  # why the latest attempt was refused; cleared when a new attempt starts
        self._started = False
        self._closing = False
        self._network_thread = 0
        self._subscriptions: dict[str, int] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._unwaited: set[int] = set()
        self._puback_failures: dict[int, str] = {}
        self._listeners: list[StateListener] = []
        self._paho = self._build_paho()

    # -- read-only state ------------------------------------------------------------------------------
    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def is_connected(self) -> bool:
        return self._state is ConnectionState.CONNECTED

    @property
    def last_error(self) -> str:
        """Why the client is not connected (refusal reason, socket or TLS error); empty once connected."""
        return self._last_error

    def add_state_listener(self, listener: StateListener) -> None:
        """Call ``listener(state, detail)`` on every change; it runs on the network thread: no blocking."""
        with self._cond:
            self._listeners.append(listener)

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> MqttClient:
        """Begin connecting in the background; returns at once (see :meth:`wait_connected`)."""
        with self._cond:
            if self._started:
                raise MqttError("client already started")
            self._started = True
        cfg = self.config
        properties = None
        if cfg.session_expiry_s:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = cfg.session_expiry_s
        self._paho.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s,
                                 clean_start=cfg.session_expiry_s == 0, properties=properties)
        self._set_state(ConnectionState.CONNECTING, "")
        self._paho.loop_start()
        return self

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; ConnectionRefused at once when the broker refuses, MqttTimeout else."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._state is not ConnectionState.CONNECTED:
                if self._refusal:
                    raise ConnectionRefused(f"broker {self.config.broker}: {self._refusal}")
                if not self._started or self._closing:
                    raise NotConnected(f"broker {self.config.broker}: client is not running")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MqttTimeout(f"broker {self.config.broker}: not connected after {timeout:g}s: "
                                      f"{self._last_error or 'no answer'}")
                self._cond.wait(remaining)

    def close(self, final: Outgoing | None = None, timeout: float = 2.0) -> None:
        """Publish ``final`` if connected (e.g. status offline), disconnect cleanly so the broker drops
        the Will, and stop the network thread. Safe to call twice."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            started = self._started
        if started:
            if final is not None and self.is_connected:
                try:
                    self.publish(final.topic, final.payload, qos=final.qos, retain=final.retain,
                                 timeout=timeout)
                except MqttError as e:
                    log.warning("event=mqtt_final_publish_failed topic=%s error=%r", final.topic, str(e))
            self._paho.disconnect()
            self._paho.loop_stop()
        self._set_state(ConnectionState.DISCONNECTED, "closed")

    def __enter__(self) -> MqttClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations -------------------------------------------------------------------------------------
    def subscribe(self, wildcard: Wildcard | Topic | str, qos: int = 1, timeout: float = 5.0) -> None:
        """Remember the subscription (made again on every connect); if connected, make it now and wait
        up to ``timeout`` for the broker's SUBACK (not from a callback: there it returns at once)."""
        filt = str(wildcard) if isinstance(wildcard, Wildcard) else str(Wildcard(str(wildcard)))
        with self._cond:
            self._subscriptions[filt] = qos
            if self._state is not ConnectionState.CONNECTED:
                return
        rc, mid = self._paho.subscribe(filt, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(f"subscribe {filt}: {paho.error_string(rc)} (will retry on reconnect)")
        if threading.get_ident() == self._network_thread:
            return
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._subacks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._unwaited.add(mid)  # drop it when it comes after all
                    raise MqttTimeout(f"subscribe {filt}: no SUBACK within {timeout:g}s")
                self._cond.wait(remaining)
            codes = self._subacks.pop(mid)
        failed = [c for c in codes if c.is_failure]
        if failed:
            raise MqttError(f"subscribe {filt}: refused by broker: {failed[0].getName()}")

    def publish(self, topic: Topic | str, payload: Payload, *, qos: int = 1, retain: bool = False,
                timeout: float = 5.0) -> None:
        """Publish and wait for the broker's PUBACK (QoS 1/2) or the write (QoS 0).

        Raises NotConnected when not connected (nothing queued) and MqttTimeout when unacknowledged in
        time. A timed-out QoS 1 message may still arrive later (paho resends it on reconnect): consumers
        must tolerate duplicates, as QoS 1 means at least once. From a callback it does not wait.
        """
        topic = topic if isinstance(topic, Topic) else Topic(topic)
        data = encode_payload(payload)
        if not self.is_connected:
            raise NotConnected(f"{topic}: not published, not connected to {self.config.broker} "
                               f"({self._last_error or self._state.value})")
        info = self._paho.publish(str(topic), data, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise NotConnected(f"{topic}: not published, the connection just dropped")
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttError(f"{topic}: not published: {paho.error_string(info.rc)}")
        if threading.get_ident() == self._network_thread:
            return
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as e:
            raise MqttError(f"{topic}: not published: {e}") from e
        if not info.is_published():
            raise MqttTimeout(f"{topic}: not acknowledged by {self.config.broker} within {timeout:g}s")
        with self._cond:
            failure = self._puback_failures.pop(info.mid, "")
        if failure:
            raise MqttError(f"{topic}: refused by broker: {failure}")

    # -- paho wiring (network thread) -------------------------------------------------------------------
    def _build_paho(self) -> paho.Client:
        cfg = self.config
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        client.enable_logger(_PAHO_LOG)
        client.suppress_exceptions = True  # a bug in a callback must not kill the network thread
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
        if cfg.tls is not None:
            client.tls_set(ca_certs=str(cfg.tls.ca) if cfg.tls.ca else None,
                           certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
                           keyfile=str(cfg.tls.key) if cfg.tls.key else None)
        client.reconnect_delay_set(cfg.reconnect_min_delay_s, cfg.reconnect_max_delay_s)  # type: ignore[arg-type]
        client.connect_timeout = cfg.connect_timeout_s
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    def _on_pre_connect(self, client: paho.Client, _userdata: Any) -> None:
        self._network_thread = threading.get_ident()
        with self._cond:
            self._refusal = ""
        if self._will is not None:
            will = self._call_factory(self._will, "will")
            if will is not None:
                client.will_set(str(will.topic), encode_payload(will.payload), will.qos, will.retain)
        self._set_state(ConnectionState.CONNECTING, "")

    def _on_connect(self, client: paho.Client, _userdata: Any, flags: paho.ConnectFlags,
                    reason: ReasonCode, _properties: Properties | None) -> None:
        if reason.is_failure:
            self._set_state(ConnectionState.BACKING_OFF,
                            f"refused: {reason.getName()} (reason code {reason.value})", refused=True)
            return
        with self._cond:
            subscriptions = list(self._subscriptions.items())
        mids = [client.subscribe(filt, qos)[1] for filt, qos in subscriptions]
        with self._cond:  # nobody waits for these SUBACKs (failures are logged)
            self._unwaited.update(mid for mid in mids if mid is not None)
        if self._birth is not None:
            birth = self._call_factory(self._birth, "birth")
            if birth is not None:
                client.publish(str(birth.topic), encode_payload(birth.payload), birth.qos, birth.retain)
        self._set_state(ConnectionState.CONNECTED, f"session_present={flags.session_present}")

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` block: the exception is still current.
        error = sys.exc_info()[1]
        refused = isinstance(error, ssl.SSLCertVerificationError)
        detail = f"TLS verification failed: {error}" if refused else f"cannot connect: {error}"
        self._set_state(ConnectionState.BACKING_OFF, detail, refused=refused)

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, flags: paho.DisconnectFlags,
                       reason: ReasonCode, _properties: Properties | None) -> None:
        with self._cond:
            closing, was = self._closing, self._state
        if closing:
            self._set_state(ConnectionState.DISCONNECTED, "closed")
        elif was is ConnectionState.CONNECTED:
            by = "broker" if flags.is_disconnect_packet_from_server else "network"
            self._set_state(ConnectionState.BACKING_OFF, f"connection lost ({by}): {reason.getName()}")
        else:  # the failed attempt's cause (refusal, socket error) is already recorded
            self._set_state(ConnectionState.BACKING_OFF, "")

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message_handler is None:
            return
        message = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))
        try:
            self._on_message_handler(message)
        except Exception:
            log.exception("event=mqtt_handler_failed topic=%s", msg.topic)

    def _on_subscribe(self, _client: paho.Client, _userdata: Any, mid: int, codes: list[ReasonCode],
                      _properties: Properties | None) -> None:
        for code in codes:
            if code.is_failure:
                log.warning("event=mqtt_subscribe_refused client_id=%s reason=%s", self.client_id,
                            code.getName())
        with self._cond:
            if mid in self._unwaited:
                self._unwaited.discard(mid)
            else:  # kept even if nobody waits yet: the SUBACK can beat subscribe()'s return
                _remember(self._subacks, mid, list(codes))
                self._cond.notify_all()

    def _on_publish(self, _client: paho.Client, _userdata: Any, mid: int, reason: ReasonCode,
                    _properties: Properties | None) -> None:
        if reason.is_failure:
            with self._cond:
                _remember(self._puback_failures, mid, reason.getName())

    def _call_factory(self, factory: OutgoingFactory, what: str) -> Outgoing | None:
        try:
            return factory()
        except Exception:
            log.exception("event=mqtt_%s_failed client_id=%s", what, self.client_id)
            return None

    def _set_state(self, state: ConnectionState, detail: str, refused: bool = False) -> None:
        with self._cond:
            old = self._state
            self._state = state
            if state is ConnectionState.CONNECTED:
                self._last_error = ""
            elif detail and state is ConnectionState.BACKING_OFF:
                self._last_error = detail
            if refused:
                self._refusal = detail
            self._cond.notify_all()
            listeners = list(self._listeners) if old is not state else []
        if old is state:
            return
        level = logging.WARNING if state is ConnectionState.BACKING_OFF and detail else logging.INFO
        log.log(level, "event=mqtt_state client_id=%s broker=%s from=%s to=%s detail=%r", self.client_id,
                self.config.broker, old.value, state.value, detail)
        for listener in listeners:
            try:
                listener(state, detail)
            except Exception:
                log.exception("event=mqtt_state_listener_failed client_id=%s", self.client_id)
