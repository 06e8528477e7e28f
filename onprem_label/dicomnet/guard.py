"""The listening socket's guards: a time limit on every read, a cap on PDU lengths and on connections per address.

pynetdicom reads a peer's declared PDU length at face value and blocks on the socket until that many
bytes arrived, before any handler of ours runs: a peer that sends six bytes and then nothing, or
declares a 4 GiB PDU and trickles it, would hold an association slot (and the memory) for ever. The
server below gives every accepted socket a read timeout and a socket whose `recv` refuses a PDU
longer than we ever accept, and refuses a connection beyond a few at once from one address.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections import Counter

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger("onprem_label.dicomnet")

# Longer than pynetdicom's own idle timeout (network_timeout, 60 s), which ends an idle association
# politely; this one ends a peer stalled inside a PDU, where that timer cannot run.
READ_TIMEOUT_S = 65.0
PER_ADDRESS = 8            # connections at once from one address (a PACS sends over a few at most)
HEADER = 6                 # PDU type, reserved byte, 4-byte length (PS3.8 9.3.1)


class PduTooLong(OSError):
    """A peer declared a PDU longer than the cap; pynetdicom treats the OSError as the connection lost."""


class GuardedSocket(socket.socket):
    """A connected socket whose reads time out and whose PDUs may not declare more than `max_pdu` bytes.

    pynetdicom reads one PDU at a time, header first, so the stream can be followed here: after each
    header, its declared length is checked before pynetdicom starts reading that many bytes.
    """

    max_pdu: int = 0
    _header: bytes = b""
    _left: int = 0  # bytes of the current PDU body still to come
    on_close = None  # called once when the connection is closed (the server's per-address count)

    def close(self) -> None:
        """socket.close, then tell whoever counts open connections."""
        super().close()
        callback, self.on_close = self.on_close, None
        if callback is not None:
            callback()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:  # noqa: D401 - socket.recv's own signature
        """socket.recv, watching the PDU framing."""
        data = super().recv(bufsize, flags)
        view = memoryview(data)
        while view:
            if self._left:
                step = min(self._left, len(view))
                self._left -= step
                view = view[step:]
                continue
            need = HEADER - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) == HEADER:
                length = struct.unpack(">L", self._header[2:])[0]
                self._header = b""
                if length > self.max_pdu:
                    raise PduTooLong(f"a PDU of {length} bytes declared (at most {self.max_pdu})")
                self._left = length
        return data


def _guarded(client: socket.socket, max_pdu: int, timeout: float) -> GuardedSocket:
    """The accepted socket as a GuardedSocket (the same file descriptor)."""
    guarded = GuardedSocket(client.family, client.type, client.proto, fileno=client.detach())
    guarded.max_pdu = max_pdu
    guarded.settimeout(timeout)
    return guarded


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the guards of this module."""

    max_pdu = 1 << 20
    read_timeout = READ_TIMEOUT_S
    per_address = PER_ADDRESS

    def __init__(self, *args, **kwargs):
        self._open: Counter = Counter()  # address -> connections accepted and not yet closed
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self):
        """Accept, then guard the socket before pynetdicom sees it."""
        client, address = super().get_request()
        return _guarded(client, self.max_pdu, self.read_timeout), address

    def verify_request(self, request, client_address) -> bool:
        """Refuse (close unread) a connection past `per_address` open ones from its address."""
        host = client_address[0]
        # A connection cut short leaves pynetdicom's association thread waiting out its ACSE timeout
        # (and holding one of the AE's association slots): those count here too.
        lingering = sum(1 for a in self.ae.active_associations
                        if a.requestor.address_info is not None and a.requestor.address == host)
        with self._open_lock:
            if max(self._open[host], lingering) >= self.per_address:
                log.warning("refused a connection from %s: %d already open from there", host,
                            max(self._open[host], lingering))
                return False
            self._open[host] += 1
        request.on_close = lambda: self._closed(host)
        return True

    def _closed(self, host: str) -> None:
        with self._open_lock:
            self._open[host] -= 1
            if self._open[host] <= 0:
                del self._open[host]
