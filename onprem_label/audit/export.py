"""Exports of the audit trail as CSV or JSON Lines, streamed, signed, and checkable offline.

Each file carries the chain fields of every event and ends in a trailer: the count, the SHA-256
of every byte before the trailer, and an Ed25519 signature of that digest by the install's export
key (derived from the keyring's root key). An auditor who keeps the export public key
(`onprem-label audit export-key`) can check a file anywhere with `verify_export`: the signature
catches any edit, a missing trailer catches a cut; with the audit key too (on the server), every
event's HMAC and link is checked against the chain.

CSV cells that a spreadsheet would run as a formula (starting with = + - @, tab or CR) are
neutralised with a leading apostrophe, and so is a cell that starts with an apostrophe, so
`read_rows` can take exactly one off and give every field back unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from onprem_label.audit.chain import CHAIN_FIELDS, FIELDS
from onprem_label.audit.verify import Problem, VerifyResult, walk

FORMATS = ("csv", "jsonl")
COLUMNS = (*FIELDS, *CHAIN_FIELDS)
SIGNING_PURPOSE = "audit-export-signing"
END_MARK = "#end"
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


class ExportError(ValueError):
    """The file is not an audit export, or cannot be read as one."""


def signing_key(keyring) -> Ed25519PrivateKey:
    """The install's export signing key (its 32-byte seed derives from the root key)."""
    return Ed25519PrivateKey.from_private_bytes(keyring.purpose_key(SIGNING_PURPOSE))


def public_key_hex(key: Ed25519PrivateKey) -> str:
    """The raw public key, hex: what an auditor keeps to check exports offline."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def neutralise(cell: str) -> str:
    """A CSV cell a spreadsheet will show as text, never run as a formula."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def unneutralise(cell: str) -> str:
    """The cell as it was before `neutralise`."""
    return cell[1:] if cell.startswith("'") else cell


def _csv_cells(event: dict[str, Any]) -> list[str]:
    cells = []
    for name in COLUMNS:
        value = event[name]
        if name == "details":
            value = json.dumps(value or {}, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        elif value is None:
            value = ""
        cells.append(neutralise(str(value)))
    return cells


def _line(cells: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(cells)
    return buffer.getvalue()


def stream_export(events: Iterable[dict[str, Any]], fmt: str, key: Ed25519PrivateKey,
                  meta: dict[str, Any]) -> Iterator[bytes]:
    """The export file, piece by piece: header, one line per event, signed trailer."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    digest, count = hashlib.sha256(), 0

    def out(text: str) -> bytes:
        data = text.encode("utf-8")
        digest.update(data)
        return data

    if fmt == "jsonl":
        yield out(json.dumps({"onprem_label_audit_export": 1, **meta}, ensure_ascii=False, sort_keys=True) + "\n")
    else:
        yield out(_line(list(COLUMNS)))
    # A few hundred lines per piece keeps the response cheap; one CSV writer serves them all.
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    for event in events:
        count += 1
        if fmt == "jsonl":
            buffer.write(encode(event) + "\n")
        else:
            writer.writerow(_csv_cells(event))
        if count % 500 == 0:
            yield out(buffer.getvalue())
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield out(buffer.getvalue())
    sha = digest.hexdigest()
    trailer = {"count": count, "sha256": sha, "meta": meta,
               "signature": key.sign(_signed(sha, count, meta)).hex(), "public_key": public_key_hex(key)}
    if fmt == "jsonl":
        yield (json.dumps({"end": trailer}, ensure_ascii=False, sort_keys=True) + "\n").encode()
    else:
        yield _line([END_MARK, json.dumps(trailer, ensure_ascii=False, sort_keys=True)]).encode()


@dataclass
class ExportFile:
    """An export opened for reading: its format, where the body ends, the trailer and the header.

    Nothing but the trailer and the header is held in memory: `events()` and `body_sha256()` read
    the file again each time (a million-event export is several hundred megabytes).
    """

    path: Path
    fmt: str
    body_end: int
    trailer: dict[str, Any] | None
    header: dict[str, Any] | None = None  # JSON Lines only: the first line

    def body_sha256(self) -> str:
        """SHA-256 of every byte before the trailer (what the signature covers)."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            left = self.body_end
            while left:
                block = f.read(min(left, 1 << 20))
                if not block:
                    break
                digest.update(block)
                left -= len(block)
        return digest.hexdigest()

    def events(self) -> Iterator[dict[str, Any]]:
        """The events, in file order (ExportError for a line that is not one)."""
        with open(self.path, "rb") as raw:
            body = io.TextIOWrapper(_Bounded(raw, self.body_end), encoding="utf-8", newline="")
            if self.fmt == "jsonl":
                body.readline()  # the header
                for line in body:  # newline="": lines end at "\n" only, never inside a value's U+2028
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise ExportError("a line of the JSON Lines export is not JSON") from None
                    if not isinstance(event, dict):
                        raise ExportError("a line of the JSON Lines export is not an event")
                    yield event
            else:
                rows = csv.reader(body)
                if tuple(next(rows, ())) != COLUMNS:
                    raise ExportError("the CSV header is not the audit export's")
                for row in rows:
                    yield _event_from_cells(row)


class _Bounded(io.RawIOBase):
    """The first `limit` bytes of a binary file, as a stream."""

    def __init__(self, raw, limit: int) -> None:
        self._raw, self._left = raw, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left <= 0:
            return 0
        data = self._raw.read(min(len(buffer), self._left))
        buffer[:len(data)] = data
        self._left -= len(data)
        return len(data)


TAIL_BYTES = 1 << 20  # a trailer is small; the last MiB always holds it


def read_export(path: Path) -> ExportFile:
    """Open an export (format from its first bytes, trailer from its last); ExportError when it is none."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(64)
        f.seek(max(0, size - TAIL_BYTES))
        tail_at = f.tell()
        tail = f.read()
    if start.startswith(b"{"):
        fmt, mark = "jsonl", b'\n{"end"'
    elif start.startswith(",".join(COLUMNS[:2]).encode()):
        fmt, mark = "csv", ("\r\n" + END_MARK + ",").encode()
    else:
        raise ExportError("not an onprem-label audit export (neither its JSON Lines nor its CSV header)")
    at = tail.rfind(mark)
    trailer, body_end = None, size
    if at >= 0:
        body_end = tail_at + at + (1 if fmt == "jsonl" else 2)
        text = tail[at:].decode("utf-8").strip("\r\n")
        trailer = json.loads(text)["end"] if fmt == "jsonl" else json.loads(next(csv.reader([text]))[1])
        if not isinstance(trailer, dict):
            raise ExportError("the trailer is not an object")
    header = None
    if fmt == "jsonl":
        with open(path, "rb") as f:
            try:
                header = json.loads(f.readline())
            except ValueError:
                raise ExportError("the first line of the JSON Lines export is not JSON") from None
        if not isinstance(header, dict) or header.get("onprem_label_audit_export") != 1:
            raise ExportError("not an onprem-label audit export (unknown header line)")
    return ExportFile(path, fmt, body_end, trailer, header)


def _event_from_cells(row: list[str]) -> dict[str, Any]:
    if len(row) != len(COLUMNS):
        raise ExportError(f"a CSV row has {len(row)} cells, not {len(COLUMNS)}")
    event: dict[str, Any] = dict(zip(COLUMNS, (unneutralise(cell) for cell in row)))
    try:
        event["id"] = int(event["id"])
        event["actor_id"] = int(event["actor_id"]) if event["actor_id"] else None
        event["details"] = json.loads(event["details"])
    except ValueError:
        raise ExportError(f"event {event['id']!r}: a number or the details are malformed") from None
    return event


def verify_export(path: Path, *, public_key: str | None = None, audit_key: bytes | None = None) -> VerifyResult:
    """Check an export: trailer, digest, signature (with `public_key`, else the one it carries),
    then the events' links (and with `audit_key`, their HMACs).

    The signature covers the body's digest, the count and the export's metadata (filters, the head
    it was cut at, its time), so none of them can be edited; an unfiltered export must end at the
    head it names.
    """
    try:
        export = read_export(path)
        trailer = export.trailer
        if trailer is None:
            return _failed("truncated", None, "the export has no trailer: it was cut short")
        count, sha, meta = trailer["count"], trailer["sha256"], trailer["meta"]
        signature, carried = bytes.fromhex(trailer["signature"]), trailer.get("public_key", "")
        if not isinstance(meta, dict):
            raise ExportError("the trailer's metadata is not an object")
    except (ExportError, UnicodeDecodeError, OSError, ValueError, KeyError, TypeError, csv.Error) as exc:
        return _failed("edited", None, f"cannot read the export: {exc}")
    if sha != export.body_sha256():
        return _failed("edited", None, "the export's lines do not match its trailer (lines edited, added or removed)")
    if export.header is not None and export.header != {"onprem_label_audit_export": 1, **meta}:
        return _failed("edited", None, "the export's header line does not match its signed trailer")
    warnings = []
    given = public_key or carried
    if not public_key:
        warnings.append(f"checked against the public key the file carries: compare it with your own copy ({given})")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(given)).verify(signature, _signed(sha, count, meta))
    except (InvalidSignature, ValueError):
        return _failed("edited", None, "the export's signature does not match (edited, or not signed by this install)")
    filters = meta.get("filters") or {}
    counted = [0]

    def events():
        for event in export.events():
            counted[0] += 1
            yield event

    try:
        result, _ = walk(events(), audit_key, start_id=None, start_prev=None, contiguous=not filters)
    except (ExportError, KeyError, TypeError, ValueError, csv.Error) as exc:
        return _failed("edited", None, f"an event of the export cannot be read: {exc}")
    if result.ok and counted[0] != count:
        return _failed("edited", None, f"the export holds {counted[0]} events but its trailer says {count}")
    if result.ok and not filters and counted[0] and result.last_id != meta.get("up_to"):
        result.problem = Problem("truncated", result.last_id + 1, f"the export names head {meta.get('up_to')} "
                                 f"but its events end at {result.last_id}")
    warnings.append(f"signed: exported {meta.get('exported_at')}, up to event {meta.get('up_to')}, "
                    f"filters {json.dumps(filters, sort_keys=True) if filters else 'none (the whole chain)'}")
    if audit_key is None:
        warnings.append("no audit key: links checked, event HMACs not (run on the server to check them)")
    result.warnings = warnings
    return result


def _signed(sha256_hex: str, count: int, meta: dict[str, Any]) -> bytes:
    body = json.dumps({"count": count, "sha256": sha256_hex, "meta": meta}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return b"onprem-label audit export v1|" + body.encode()


def _failed(kind: str, event_id: int | None, message: str) -> VerifyResult:
    result = VerifyResult()
    result.problem = Problem(kind, event_id, message)
    return result
