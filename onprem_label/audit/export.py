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
    pending = []
    for event in events:
        count += 1
        pending.append(json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n" if fmt == "jsonl"
                       else _line(_csv_cells(event)))
        if len(pending) >= 500:  # a few hundred lines per write keeps the response cheap
            yield out("".join(pending))
            pending = []
    if pending:
        yield out("".join(pending))
    sha = digest.hexdigest()
    trailer = {"count": count, "sha256": sha, "meta": meta,
               "signature": key.sign(_signed(sha, count, meta)).hex(), "public_key": public_key_hex(key)}
    if fmt == "jsonl":
        yield (json.dumps({"end": trailer}, ensure_ascii=False, sort_keys=True) + "\n").encode()
    else:
        yield _line([END_MARK, json.dumps(trailer, ensure_ascii=False, sort_keys=True)]).encode()


@dataclass
class ExportFile:
    """A parsed export: its events, trailer and the digest of its body as read."""

    fmt: str
    events: list[dict[str, Any]]
    trailer: dict[str, Any] | None
    body_sha256: str
    header: dict[str, Any] | None = None  # JSON Lines only: the first line


def read_export(path: Path) -> ExportFile:
    """Parse an export file (format from its first byte); ExportError when it is none."""
    data = Path(path).read_bytes()
    text = data.decode("utf-8", errors="strict") if data else ""
    if text.startswith("{"):
        return _read_jsonl(text)
    if text.startswith(",".join(COLUMNS[:2])):
        return _read_csv(text)
    raise ExportError("not an onprem-label audit export (neither its JSON Lines nor its CSV header)")


def _read_jsonl(text: str) -> ExportFile:
    # Split on "\n" alone: a value may hold U+2028 and the like, which str.splitlines would cut at.
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    trailer = None
    if lines and lines[-1].startswith('{"end"'):
        trailer = json.loads(lines.pop())["end"]
    body = "".join(lines)
    try:
        header = json.loads(lines[0]) if lines else {}
        events = [json.loads(line) for line in lines[1:]]
    except ValueError:
        raise ExportError("a line of the JSON Lines export is not JSON") from None
    if not isinstance(header, dict) or header.get("onprem_label_audit_export") != 1:
        raise ExportError("not an onprem-label audit export (unknown header line)")
    return ExportFile("jsonl", events, trailer, hashlib.sha256(body.encode()).hexdigest(), header)


def _read_csv(text: str) -> ExportFile:
    end = text.rfind("\r\n" + END_MARK + ",")
    trailer, body = None, text
    if end >= 0:
        body = text[:end + 2]
        trailer = json.loads(next(csv.reader(io.StringIO(text[end + 2:])))[1])
    rows = list(csv.reader(io.StringIO(body, newline="")))
    if not rows or tuple(rows[0]) != COLUMNS:
        raise ExportError("the CSV header is not the audit export's")
    events = [_event_from_cells(row) for row in rows[1:]]
    return ExportFile("csv", events, trailer, hashlib.sha256(body.encode()).hexdigest())


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
    if sha != export.body_sha256 or count != len(export.events):
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
    result, _ = walk(iter(export.events), audit_key, start_id=None, start_prev=None, contiguous=not filters)
    if result.ok and not filters and export.events and result.last_id != meta.get("up_to"):
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
