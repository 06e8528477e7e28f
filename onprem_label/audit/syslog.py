"""Audit events as RFC 5424 syslog messages, forwarded over TCP with RFC 6587 octet counting.

`format_message` renders one event; `SyslogForwarder` ships them to a collector on the LAN from a
background thread, so a request that has already committed its audit event is never slowed down or
failed by the log host. Delivery is best effort, at least once while a connection holds: a message
whose write fails is sent again after reconnecting, and what cannot be queued is counted, not kept.

One event is always one message on one line: every control and line-separator character, in the
structured data and in MSG alike, is written as a visible escape (\\r, \\n, \\t, \\xNN, \\uNNNN), and
backslash itself as \\\\, so an attacker-chosen user name can never forge a second log line.
"""

from __future__ import annotations

import logging
import queue
import re
import select
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable, Iterable

from onprem_label.logs import HIDE_EXCEPTION_TEXT

log = logging.getLogger("onprem_label.audit")

# 32473 is the Private Enterprise Number RFC 5612 reserves for documentation; a site with its own
# IANA number should put it here so collectors can tell our SD-ID from anyone else's.
SD_ID = "audit@32473"
FACILITY_AUTHPRIV = 10
SEVERITIES = {"success": 6, "denied": 4, "failure": 3}  # info, warning, err
BOM = "\ufeff".encode("utf-8")

_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")
_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")
# C0, DEL, C1 (NEL among them), line/paragraph separators, bidi overrides, lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}
_WAKE = object()  # queued by close() so an idle worker notices at once


def format_message(event: dict[str, Any], *, hostname: str, app_name: str = "onprem-label",
                   facility: int = FACILITY_AUTHPRIV) -> bytes:
    """One event as an RFC 5424 message: header, `[audit@32473 ...]` structured data, BOM + UTF-8 text."""
    if not 0 <= facility <= 23:
        raise ValueError(f"syslog facility {facility} is not 0..23")
    outcome = event["outcome"]
    if outcome not in SEVERITIES:
        raise ValueError(f"unknown audit outcome {outcome!r}")
    ts = event["ts"] if _TIMESTAMP.fullmatch(event["ts"] or "") else "-"
    header = " ".join((f"<{facility * 8 + SEVERITIES[outcome]}>1", ts, _header_field(hostname, 255),
                       _header_field(app_name, 48), "-", _header_field(event["action"], 32)))
    obj = f"{event['object_type']}:{event['object_id']}" if event["object_type"] else ""
    params = (("id", event["id"]), ("actor", event["actor_name"]), ("role", event["actor_role"]),
              ("object", obj), ("study", event["study_uid"]), ("outcome", outcome),
              ("addr", event["client_addr"]), ("request_id", event["request_id"]), ("hash", event["hash"]))
    sd = "[" + SD_ID + "".join(f' {name}="{_param_value(value)}"' for name, value in params) + "]"
    return f"{header} {sd} ".encode("utf-8") + BOM + _summary(event).encode("utf-8")


def frame(message: bytes) -> bytes:
    """RFC 6587 octet counting: the message's length in bytes, a space, the message."""
    return b"%d %s" % (len(message), message)


class SyslogForwarder:
    """Sends audit events to a syslog collector over one TCP connection, from a daemon thread.

    `send` never blocks and never raises; `dropped` counts events that will never be sent (queue
    full, unrenderable, or still queued when `close` gave up); `sent` counts those written.
    """

    def __init__(self, host: str, port: int, *, hostname: str, queue_size: int = 10000,
                 timeout: float = 5.0, connect: Callable[..., socket.socket] = socket.create_connection,
                 app_name: str = "onprem-label", facility: int = FACILITY_AUTHPRIV,
                 backoff: tuple[float, float] = (0.1, 30.0)) -> None:
        if queue_size < 1:  # queue.Queue(0) would be unbounded: memory, not events, would run out
            raise ValueError("queue_size must be at least 1")
        self.address = (host, port)
        self.hostname, self.app_name, self.facility = hostname, app_name, facility
        self.timeout = timeout
        self.dropped = 0
        self.sent = 0
        self._connect = connect
        self._backoff = backoff
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._deadline = float("inf")
        self._flushed = False  # set by the worker as it stops: nothing was left behind
        # Worker-thread state: the connection, whether it has carried a frame yet, the backoff.
        self._sock: socket.socket | None = None
        self._fresh = True
        self._delay = backoff[0]
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def send(self, events: Iterable[dict[str, Any]] | dict[str, Any]) -> None:
        """Queue events for sending; full queue or bad event: dropped and counted, never raised."""
        try:
            for event in (events,) if isinstance(events, Mapping) else events:
                self._offer(event)
        except Exception:  # the caller's transaction is committed; nothing here may undo its reply
            log.exception("audit syslog: could not queue events")

    def close(self, timeout: float = 5.0) -> bool:
        """Stop, first sending what is queued for up to `timeout` seconds; True if nothing was left."""
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        try:
            self._queue.put_nowait(_WAKE)
        except queue.Full:
            pass  # a full queue means the worker is busy, not waiting: it sees _closing soon
        self._thread.join(timeout + 1.0)
        return not self._thread.is_alive() and self._flushed

    def _offer(self, event: dict[str, Any]) -> None:
        if self._closing.is_set():
            self._drop()
            return
        try:
            data = frame(format_message(event, hostname=self.hostname, app_name=self.app_name,
                                        facility=self.facility))
        except Exception:
            # The event's details (which the error may quote) belong in the trail, not in the log.
            log.warning("audit syslog: could not format an event; dropped", exc_info=True,
                        extra=HIDE_EXCEPTION_TEXT)
            self._drop()
            return
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            self._drop()

    def _drop(self, count: int = 1) -> None:
        with self._lock:
            self.dropped += count

    def _run(self) -> None:
        """The worker: one frame at a time, in order, each retried on a new connection until sent."""
        pending: bytes | None = None
        try:
            while True:
                if pending is None:
                    pending = self._next()
                if pending is None or (self._closing.is_set() and time.monotonic() >= self._deadline):
                    return
                if self._deliver(pending):
                    pending = None
        except Exception:  # a dead worker would drop everything silently; say so loudly instead
            log.exception("audit syslog: forwarder stopped")
        finally:
            self._disconnect()
            left = int(pending is not None) + self._discard_queue()
            self._flushed = left == 0
            self._drop(left)

    def _deliver(self, data: bytes) -> bool:
        """Write one frame, connecting first if need be; False (after any backoff) if it failed."""
        if self._sock is None:
            try:
                self._sock = self._connect(self.address, self._connect_timeout())
            except Exception as exc:  # OSError, or whatever a custom `connect` raises
                if self._delay == self._backoff[0]:
                    log.warning("audit syslog: cannot reach %s:%s: %s", *self.address, exc)
                self._back_off()
                return False
            self._fresh = True
        try:
            if _peer_closed(self._sock):
                raise ConnectionResetError("collector closed the connection")
            self._sock.sendall(data)
        except Exception as exc:
            log.warning("audit syslog: connection to %s:%s lost: %s", *self.address, exc)
            self._disconnect()
            if self._fresh:  # failed before a single write: back off, or a bad peer spins us
                self._back_off()
            return False
        self._fresh = False
        self._delay = self._backoff[0]
        with self._lock:
            self.sent += 1
        return True

    def _back_off(self) -> None:
        self._pause(self._delay)
        self._delay = min(self._delay * 2, self._backoff[1])

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _next(self) -> bytes | None:
        """The next frame; blocks while running, returns None once closing and drained."""
        while True:
            try:
                if self._closing.is_set():
                    item = self._queue.get_nowait()
                else:
                    item = self._queue.get(timeout=1.0)  # the timeout is only a safety net
            except queue.Empty:
                if self._closing.is_set():
                    return None
                continue
            if item is not _WAKE:
                return item

    def _connect_timeout(self) -> float:
        """The configured timeout, cut to what is left of close()'s deadline while closing."""
        if not self._closing.is_set():
            return self.timeout
        return max(0.01, min(self.timeout, self._deadline - time.monotonic()))

    def _pause(self, delay: float) -> None:
        """Back off; closing cuts a wait short, but never beyond close()'s deadline."""
        if not self._closing.is_set():
            self._closing.wait(delay)
        else:
            time.sleep(max(0.0, min(delay, self._deadline - time.monotonic())))

    def _discard_queue(self) -> int:
        count = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return count
            count += item is not _WAKE


def _peer_closed(sock: socket.socket) -> bool:
    """True if the collector hung up; a collector never talks, so readable means EOF or reset.

    Checked before each write because a write into a half-closed connection succeeds locally
    and the message is lost; this catches the common case of a collector restart.
    """
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
    except (ValueError, TypeError):  # not a selectable socket (a test double): let sendall decide
        return False


def _header_field(value: Any, limit: int) -> str:
    """A header field: printable US-ASCII, no spaces, at most `limit` octets, "-" when empty."""
    text = _NOT_PRINTUSASCII.sub("_", str(value or ""))[:limit]
    return text or "-"


def _escape_unsafe(text: str) -> str:
    return _UNSAFE.sub(lambda m: _NAMED.get(m.group()) or _hex(m.group()), text)


def _hex(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _param_value(value: Any) -> str:
    """PARAM-VALUE: RFC 5424 6.3.3 escapes `"`, `\\` and `]`; control characters are made visible."""
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return _escape_unsafe(text)


def _summary(event: dict[str, Any]) -> str:
    """MSG: one human line, e.g. `alice auth:login success from 10.0.0.5`."""
    actor = event["actor_name"] or ("-" if event["actor_id"] is None else f"#{event['actor_id']}")
    text = f"{actor} {event['action']} {event['outcome']}"
    if event["object_type"]:
        text += f" {event['object_type']}:{event['object_id']}"
    text += f" from {event['client_addr'] or '-'}"
    # Backslash doubled first, so an escape this writes can never be mistaken for one typed in.
    return _escape_unsafe(text.replace("\\", "\\\\"))
