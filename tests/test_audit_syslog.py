"""RFC 5424 audit messages over RFC 6587 TCP framing, and the forwarder that never holds up a request."""

from __future__ import annotations

import queue
import re
import select
import socket
import threading
import time

import pytest

from onprem_label.audit.syslog import BOM, SD_ID, SyslogForwarder, format_message, frame

WAIT = 5.0  # the bound on every wait: a bug fails the test instead of hanging it
FAST = (0.01, 0.05)  # backoff for tests: retries in milliseconds, not seconds
HEADER = re.compile(rb"<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) ")


def make_event(**changes) -> dict:
    """A complete audit event dict; keyword arguments override fields."""
    event = {
        "id": 42, "ts": "2026-12-01T10:48:29.123Z", "actor_id": 7, "actor_name": "alice",
        "actor_role": "admin,auditor", "action": "auth:login", "object_type": "user", "object_id": "7",
        "study_uid": "", "outcome": "success", "client_addr": "10.1.2.3", "user_agent": "Mozilla/5.0",
        "request_id": "req-7f3a", "details": {}, "prev_hash": "a" * 64, "hash": "b" * 64,
    }
    event.update(changes)
    return event


def parse(message: bytes) -> dict:
    """Split an RFC 5424 message into header fields, SD params (unescaped per 6.3.3) and MSG."""
    header = HEADER.match(message)
    assert header, message
    pri, ts, host, app, procid, msgid = header.groups()
    rest = message[header.end():].decode("utf-8")
    assert rest.startswith("[" + SD_ID), rest
    params, i = {}, len(SD_ID) + 1
    while rest[i] == " ":
        eq = rest.index("=", i)
        name = rest[i + 1:eq]
        assert rest[eq + 1] == '"'
        value, i = [], eq + 2
        while rest[i] != '"':
            if rest[i] == "\\" and rest[i + 1] in '"\\]':
                i += 1  # an RFC 5424 escape; any other backslash is literal
            assert rest[i] != "]" or rest[i - 1] == "\\", "unescaped ] inside a PARAM-VALUE"
            value.append(rest[i])
            i += 1
        params[name] = "".join(value)
        i += 1
    assert rest[i] == "]" and rest[i + 1] == " "
    msg = rest[i + 2:].encode("utf-8")
    assert msg.startswith(BOM)
    return {"pri": int(pri), "ts": ts.decode(), "host": host.decode(), "app": app.decode(),
            "procid": procid.decode(), "msgid": msgid.decode(), "sd": params,
            "msg": msg[len(BOM):].decode("utf-8")}


class Collector:
    """A loopback syslog receiver: one connection at a time, RFC 6587 octet-counted frames."""

    def __init__(self, drop_after: int | None = None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.errors: list[str] = []
        self.connections = 0
        self.drop_after = drop_after  # hang up the first connection after this many messages
        self.hung_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def get(self) -> bytes:
        """The next message received, waiting at most WAIT seconds."""
        return self.messages.get(timeout=WAIT)

    def stop(self) -> None:
        """Stop accepting and close the listener."""
        self._stop.set()
        self._thread.join(WAIT)
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(0.2)
                self._read(conn, limit=self.drop_after if self.connections == 1 else None)
            if self.connections == 1 and self.drop_after is not None:
                self.hung_up.set()

    def _read(self, conn: socket.socket, limit: int | None) -> None:
        buffer, count = b"", 0
        while not self._stop.is_set() and (limit is None or count < limit):
            if b" " in buffer:
                length, _, rest = buffer.partition(b" ")
                if not length.isdigit():
                    self.errors.append(f"bad frame length {length!r}")
                    return
                if len(rest) >= int(length):
                    self.messages.put(rest[:int(length)])
                    buffer, count = rest[int(length):], count + 1
                    continue
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                if buffer:
                    self.errors.append(f"connection ended inside a frame: {buffer[:40]!r}")
                return
            buffer += chunk


@pytest.fixture
def collector():
    """A running loopback collector, stopped after the test."""
    c = Collector()
    yield c
    c.stop()
    assert c.errors == []


def forwarder_for(collector: Collector, **kwargs) -> SyslogForwarder:
    """A forwarder to the collector with test-speed backoff."""
    kwargs.setdefault("backoff", FAST)
    return SyslogForwarder("127.0.0.1", collector.port, hostname="label01", **kwargs)


def refused_port() -> socket.socket:
    """A bound but non-listening loopback socket: connecting to its port is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_until(condition, what: str) -> None:
    """Poll `condition` until it holds, failing after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# --- format_message --------------------------------------------------------------------------

@pytest.mark.parametrize("outcome, severity", [("success", 6), ("denied", 4), ("failure", 3)])
def test_pri_is_authpriv_with_severity_from_outcome(outcome, severity):
    """PRI = facility 10 (authpriv) * 8 + severity: info, warning, err."""
    assert parse(format_message(make_event(outcome=outcome), hostname="h"))["pri"] == 80 + severity


def test_other_facility_and_bad_facility():
    """The facility is a parameter; one outside 0..23 is refused."""
    assert parse(format_message(make_event(), hostname="h", facility=13))["pri"] == 13 * 8 + 6
    with pytest.raises(ValueError):
        format_message(make_event(), hostname="h", facility=24)


def test_unknown_outcome_is_refused():
    """An outcome the trail does not define is an error."""
    with pytest.raises(ValueError, match="outcome"):
        format_message(make_event(outcome="meh"), hostname="h")


def test_header_fields():
    """VERSION 1, TIMESTAMP = ts, HOSTNAME, APP-NAME, PROCID "-", MSGID = action."""
    parsed = parse(format_message(make_event(), hostname="label01.example", app_name="onprem-label"))
    assert (parsed["ts"], parsed["host"], parsed["app"], parsed["procid"], parsed["msgid"]) == (
        "2026-12-01T10:48:29.123Z", "label01.example", "onprem-label", "-", "auth:login")


def test_msgid_and_hostname_are_sanitized_to_printable_ascii():
    """MSGID is printable US-ASCII, at most 32 octets; spaces and non-ASCII cannot split the header."""
    parsed = parse(format_message(make_event(action="weird act\u00efon:" + "x" * 40),
                                  hostname="bad host\n"))
    assert parsed["msgid"] == ("weird_act_on:" + "x" * 40)[:32]
    assert parsed["host"] == "bad_host_"
    assert parse(format_message(make_event(action=""), hostname=""))["msgid"] == "-"


def test_bad_timestamp_becomes_nilvalue():
    """A ts that is not an RFC 5424 TIMESTAMP is sent as "-" rather than breaking the header."""
    assert parse(format_message(make_event(ts="yesterday at noon"), hostname="h"))["ts"] == "-"


def test_structured_data_holds_the_event():
    """One [audit@32473 ...] element with id, actor, role, object, study, outcome, addr, request id, hash."""
    parsed = parse(format_message(make_event(study_uid="2.25.99"), hostname="h"))
    assert parsed["sd"] == {"id": "42", "actor": "alice", "role": "admin,auditor", "object": "user:7",
                            "study": "2.25.99", "outcome": "success", "addr": "10.1.2.3",
                            "request_id": "req-7f3a", "hash": "b" * 64}


def test_param_values_escape_quote_backslash_and_bracket():
    """`"`, `\\` and `]` are escaped per RFC 5424 6.3.3 and come back exact."""
    name = 'a"b]c\\d"]\\'
    raw = format_message(make_event(actor_name=name), hostname="h")
    assert b'actor="a\\"b\\]c\\\\d\\"\\]\\\\"' in raw
    assert parse(raw)["sd"]["actor"] == name


def test_crlf_in_a_name_stays_inside_one_line():
    """A name with CR/LF and a fake message produces no raw CR or LF anywhere: one event, one line."""
    raw = format_message(make_event(actor_name="eve\r\nFAKE <13>1 - - - - - - forged"), hostname="h")
    assert b"\r" not in raw and b"\n" not in raw
    parsed = parse(raw)
    assert parsed["sd"]["actor"] == "eve\\r\\nFAKE <13>1 - - - - - - forged"
    assert parsed["msg"].startswith("eve\\r\\nFAKE <13>1")


@pytest.mark.parametrize("char, shown", [("\x00", "\\x00"), ("\x1b", "\\x1b"), ("\t", "\\t"),
                                         ("\x7f", "\\x7f"), ("\x85", "\\x85"), ("\u2028", "\\u2028"),
                                         ("\u202e", "\\u202e"), ("\ud800", "\\ud800")])
def test_control_and_separator_characters_are_made_visible(char, shown):
    """C0, DEL, C1 (NEL), line separators, bidi overrides and lone surrogates are written as escapes."""
    parsed = parse(format_message(make_event(actor_name=f"x{char}y", user_agent=f"x{char}y"), hostname="h"))
    assert parsed["sd"]["actor"] == f"x{shown}y"
    assert parsed["msg"].startswith(f"x{shown}y ")


def test_literal_backslash_cannot_imitate_an_escape():
    """A typed backslash-n shows as \\\\n in MSG, so it differs from a real newline's \\n."""
    typed = parse(format_message(make_event(actor_name="x\\nFAKE"), hostname="h"))["msg"]
    real = parse(format_message(make_event(actor_name="x\nFAKE"), hostname="h"))["msg"]
    assert typed.startswith("x\\\\nFAKE") and real.startswith("x\\nFAKE")
    assert typed != real


def test_msg_is_utf8_with_bom_and_a_human_summary():
    """MSG is BOM + UTF-8: actor, action, outcome, object and address in one short line."""
    parsed = parse(format_message(make_event(actor_name="zoë", outcome="denied"), hostname="h"))
    assert parsed["msg"] == "zoë auth:login denied user:7 from 10.1.2.3"


def test_frame_is_octet_counted():
    """RFC 6587: the byte length (not character count), a space, then the message."""
    message = format_message(make_event(actor_name="zoë"), hostname="h")
    assert frame(message) == str(len(message)).encode() + b" " + message


# --- SyslogForwarder -------------------------------------------------------------------------

def test_forwarder_delivers_framed_messages_in_order(collector):
    """Events arrive as separate octet-counted frames, in order, byte-identical to format_message."""
    forwarder = forwarder_for(collector)
    events = [make_event(id=i, actor_name=f"u\r\n{i}") for i in range(1, 6)]
    forwarder.send(events)
    received = [collector.get() for _ in events]
    assert received == [format_message(e, hostname="label01") for e in events]
    assert [parse(m)["sd"]["id"] for m in received] == ["1", "2", "3", "4", "5"]
    assert forwarder.close(WAIT) and forwarder.sent == 5 and forwarder.dropped == 0


def test_send_accepts_a_single_event(collector):
    """send() given one dict sends that event (not its keys)."""
    forwarder = forwarder_for(collector)
    forwarder.send(make_event(id=9))
    assert parse(collector.get())["sd"]["id"] == "9"
    assert forwarder.close(WAIT)


def test_reconnects_after_the_collector_hangs_up():
    """When the collector closes the connection, the next event goes out on a new connection."""
    collector = Collector(drop_after=1)
    try:
        forwarder = forwarder_for(collector)
        forwarder.send([make_event(id=1)])
        assert parse(collector.get())["sd"]["id"] == "1"
        assert collector.hung_up.wait(WAIT)
        forwarder.send([make_event(id=2)])
        assert parse(collector.get())["sd"]["id"] == "2"
        assert collector.connections == 2
        assert forwarder.close(WAIT) and forwarder.dropped == 0
    finally:
        collector.stop()
    assert collector.errors == []


def test_retries_with_backoff_until_the_collector_is_reachable(collector):
    """Refused connections are retried with backoff; the queued event is sent once one succeeds."""
    attempts = []

    def flaky_connect(address, timeout):
        attempts.append(time.monotonic())
        if len(attempts) < 4:
            raise ConnectionRefusedError("not yet")
        return socket.create_connection(address, timeout)

    forwarder = forwarder_for(collector, connect=flaky_connect)
    forwarder.send([make_event(id=3)])
    assert parse(collector.get())["sd"]["id"] == "3"
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= FAST[0] * 0.9 and gaps[-1] >= gaps[0]  # waited, and the waits grew
    assert forwarder.close(WAIT)


def test_full_queue_drops_and_counts_without_blocking(collector):
    """With the worker stuck connecting, send() returns at once; what the queue cannot hold is counted."""
    entered, release = threading.Event(), threading.Event()

    def stuck_connect(address, timeout):
        entered.set()
        if not release.wait(WAIT):
            raise TimeoutError("test never released the connection")
        return socket.create_connection(address, timeout)

    forwarder = forwarder_for(collector, connect=stuck_connect, queue_size=3)
    forwarder.send([make_event(id=1)])  # taken by the worker, which then hangs in connect
    assert entered.wait(WAIT)
    started = time.monotonic()
    forwarder.send([make_event(id=i) for i in range(2, 12)])
    assert time.monotonic() - started < 1.0
    assert forwarder.dropped == 7  # 3 queued behind the one in hand, 7 dropped
    release.set()
    assert [parse(collector.get())["sd"]["id"] for _ in range(4)] == ["1", "2", "3", "4"]
    assert forwarder.close(WAIT) and forwarder.sent == 4 and forwarder.dropped == 7


def test_send_never_raises():
    """Broken events and non-iterables are swallowed; broken events count as dropped."""
    port = refused_port()
    try:
        forwarder = SyslogForwarder("127.0.0.1", port.getsockname()[1], hostname="h", backoff=FAST)
        forwarder.send([{"id": 1}, make_event(outcome="bogus"), 17])
        forwarder.send(None)
        forwarder.send(42)
        assert forwarder.dropped == 3
        forwarder.close(0.1)
    finally:
        port.close()


def test_close_flushes_what_is_queued(collector):
    """close() sends everything still queued before it returns True."""
    forwarder = forwarder_for(collector)
    forwarder.send([make_event(id=i) for i in range(500)])
    assert forwarder.close(WAIT)
    assert forwarder.sent == 500 and forwarder.dropped == 0
    ids = [int(parse(collector.get())["sd"]["id"]) for _ in range(500)]
    assert ids == list(range(500))


def test_close_gives_up_on_an_unreachable_collector_in_time():
    """With nothing listening, close(timeout) returns False near its timeout and counts the loss."""
    port = refused_port()
    try:
        forwarder = SyslogForwarder("127.0.0.1", port.getsockname()[1], hostname="h", backoff=FAST)
        forwarder.send([make_event(id=i) for i in range(5)])
        started = time.monotonic()
        assert forwarder.close(0.3) is False
        assert time.monotonic() - started < 0.3 + 1.0
        assert forwarder.sent == 0 and forwarder.dropped == 5
    finally:
        port.close()


def test_send_after_close_is_dropped(collector):
    """A closed forwarder sends nothing more and counts what it was given."""
    forwarder = forwarder_for(collector)
    assert forwarder.close(WAIT)
    forwarder.send([make_event()])
    assert forwarder.dropped == 1
    with pytest.raises(queue.Empty):
        collector.messages.get(timeout=0.1)


def test_idle_close_is_prompt(collector):
    """Closing an idle forwarder does not wait out a poll interval."""
    forwarder = forwarder_for(collector)
    started = time.monotonic()
    assert forwarder.close(WAIT)
    assert time.monotonic() - started < 0.5


def test_queue_size_must_be_positive():
    """queue_size=0 would mean an unbounded queue, so it is refused."""
    with pytest.raises(ValueError):
        SyslogForwarder("127.0.0.1", 1, hostname="h", queue_size=0)


def test_a_collector_that_hangs_up_at_once_is_retried_with_backoff():
    """Connections that die before carrying a frame back off instead of spinning on connect."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def hang_up_on_everyone():
        while not stop.is_set():
            try:
                listener.accept()[0].close()
            except TimeoutError:
                pass

    server = threading.Thread(target=hang_up_on_everyone, daemon=True)
    server.start()
    attempts = []

    def connect_and_see_the_hang_up(address, timeout):
        sock = socket.create_connection(address, timeout)
        select.select([sock], [], [], WAIT)  # the hang-up has arrived before the first write
        attempts.append(time.monotonic())
        return sock

    try:
        forwarder = SyslogForwarder("127.0.0.1", listener.getsockname()[1], hostname="h",
                                    connect=connect_and_see_the_hang_up, backoff=FAST)
        forwarder.send([make_event()])
        wait_until(lambda: len(attempts) >= 3, "reconnect attempts")
        time.sleep(0.25)
        assert len(attempts) < 20  # backoff of 10..50 ms; without it, hundreds
        assert forwarder.close(0.1) is False
        assert forwarder.sent == 0 and forwarder.dropped == 1
    finally:
        stop.set()
        server.join(WAIT)
        listener.close()
