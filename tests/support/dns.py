"""A DNS server on loopback (UDP) that answers A queries from a table, so a test can give a name
several addresses without touching the machine's resolver (gRPC's ``dns://SERVER/NAME:PORT``)."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Mapping, Sequence

A, IN = 1, 1
NXDOMAIN = 3


class TinyDNS:
    """Answers ``names`` (name → IPv4 addresses); every other type gets no answer, an unknown name
    NXDOMAIN."""

    def __init__(self, names: Mapping[str, Sequence[str]]) -> None:
        self.names = {name.lower(): list(addresses) for name, addresses in names.items()}
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.socket.recvfrom(512)
            except OSError:  # closed
                return
            self.socket.sendto(self.answer(query), peer)

    def answer(self, query: bytes) -> bytes:
        ident = query[:2]
        at, labels = 12, []
        while query[at]:
            labels.append(query[at + 1:at + 1 + query[at]].decode("ascii"))
            at += 1 + query[at]
        (qtype,) = struct.unpack(">H", query[at + 1:at + 3])
        name = ".".join(labels).lower()
        addresses = self.names.get(name, []) if qtype == A else []
        flags = 0x8180 | (0 if name in self.names else NXDOMAIN)  # a response, recursion available
        out = ident + struct.pack(">HHHHH", flags, 1, len(addresses), 0, 0) + query[12:at + 5]
        for address in addresses:  # 0xC00C: the name at offset 12, the question's
            out += struct.pack(">HHHIH", 0xC00C, A, IN, 30, 4) + socket.inet_aton(address)
        return out

    def close(self) -> None:
        self.socket.close()
