"""Walking the chain: every event's id, link and HMAC, the archive anchor and the checkpoints.

The first bad event is named with what is wrong with it:
- `missing`: ids jump (events were deleted);
- `edited`: an event's HMAC does not match its fields (changed, forged, or the chain rebuilt with
  another key);
- `reordered`: an event is intact but does not follow the one before it (moved, or the event
  before it was replaced);
- `truncated`: the chain is shorter than a checkpoint saw it, or ends in another event.
"""

from __future__ import annotations

import hmac
import json
import re
from datetime import datetime
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from sqlalchemy import Connection

from onprem_label.audit.chain import CHAIN_FIELDS, FIELDS, GENESIS_HASH, anchor_mac, canonical, format_ts
from onprem_label.audit.checkpoints import Checkpoint
from onprem_label.db.models import AuditAnchor


@dataclass(frozen=True)
class Problem:
    """What is wrong, and with which event (None: not one event, e.g. a forged checkpoint)."""

    kind: str
    event_id: int | None
    message: str


@dataclass
class VerifyResult:
    """The outcome of one walk."""

    events: int = 0
    first_id: int | None = None
    last_id: int = 0
    head: str = GENESIS_HASH
    problem: Problem | None = None
    checkpoints: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-able data (API and `--json`)."""
        problem = None if self.problem is None else {
            "kind": self.problem.kind, "event_id": self.problem.event_id, "message": self.problem.message}
        return {"ok": self.ok, "events": self.events, "first_id": self.first_id, "last_id": self.last_id,
                "head": self.head, "checkpoints_checked": self.checkpoints, "problem": problem,
                "warnings": self.warnings}


def is_hex64(value: Any) -> bool:
    """True for 64 lowercase hex digits (a SHA-256 in hex); anything else in a hash field is tampering."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def same(a: Any, b: str) -> bool:
    """Constant-time equality that is False (never an exception) for a malformed stored value."""
    return is_hex64(a) and hmac.compare_digest(a, b)


def walk(rows: Iterable[Any], key: bytes | None, *, start_id: int | None = 1, start_prev: str | None = GENESIS_HASH,
         want: set[int] | None = None, contiguous: bool = True) -> tuple[VerifyResult, dict[int, str]]:
    """Check `rows` (mappings with the chain's fields, in id order) as one stretch of the chain.

    `start_id`/`start_prev` None: the stretch starts wherever its first row says (an export).
    `key` None: only ids and links are checked (no HMAC; an auditor without the key).
    `contiguous` False: a filtered export, where only rows with consecutive ids are linked.
    Returns the result and the hashes at the ids in `want` (checkpoint positions).
    """
    result, seen = VerifyResult(), {}
    want = want or set()
    expected_id, expected_prev = start_id, start_prev
    for row in rows:
        row_id, prev, digest = int(row["id"]), row["prev_hash"], row["hash"]
        if result.first_id is None:
            result.first_id = row_id
        if not (is_hex64(prev) and is_hex64(digest)):
            result.problem = Problem("edited", row_id, f"event {row_id} has a malformed hash field (edited)")
            return result, seen
        if expected_id is not None and row_id != expected_id:
            if row_id < expected_id:
                result.problem = Problem("reordered", row_id, f"event {row_id} appears after event {expected_id - 1}")
                return result, seen
            if contiguous:
                gap = f"event {expected_id}" if row_id == expected_id + 1 else f"events {expected_id}..{row_id - 1}"
                result.problem = Problem("missing", expected_id, f"{gap} missing (deleted) before event {row_id}")
                return result, seen
            expected_prev = None  # a filtered export skips ids: no link to check across the gap
        own_ok = key is None or hmac.compare_digest(
            digest, hmac.digest(key, canonical(row) + b"\n" + prev.encode("ascii"), "sha256").hex())
        if expected_prev is not None and prev != expected_prev:
            if own_ok:
                result.problem = Problem("reordered", row_id, f"event {row_id} is intact but does not follow "
                                         f"event {row_id - 1} (moved, or the event before it was replaced)")
            else:
                result.problem = Problem("edited", row_id, f"event {row_id} does not match its HMAC and does not "
                                         f"follow event {row_id - 1} (forged or edited)")
            return result, seen
        if not own_ok:
            result.problem = Problem("edited", row_id, f"event {row_id} does not match its HMAC (a field was edited, "
                                     "the event forged, or the chain rebuilt without the audit key)")
            return result, seen
        if row_id in want:
            seen[row_id] = digest
        result.events += 1
        result.last_id, result.head = row_id, digest
        expected_id, expected_prev = row_id + 1, digest
    return result, seen


def verify_database(conn: Connection, key: bytes, checkpoints: list[Checkpoint] | None = None,
                    bad_checkpoint_lines: int = 0, *, since_checkpoint: bool = False) -> VerifyResult:
    """Walk the whole chain in the database (after the last archive anchor) and the checkpoints.

    Read the checkpoints before calling: every checkpoint read then names committed events, so a
    checkpoint written while the walk runs cannot look like a truncation.
    `since_checkpoint`: walk only the events after the newest valid checkpoint, starting from the
    head it holds (its HMAC vouches for it); the event each checkpoint names is still checked,
    one by one. A cheap check (the doctor's): an edit between checkpoints is left to a full walk.
    """
    warnings = []
    anchor = conn.execute(_ANCHOR).first()
    start_id, start_prev = 1, GENESIS_HASH
    if anchor is not None:
        if not (is_hex64(anchor.last_hash) and same(anchor.mac, anchor_mac(
                key, anchor.first_id, anchor.last_id, anchor.last_hash, anchor.file_name, anchor.file_sha256))):
            result = VerifyResult()
            result.problem = Problem("edited", anchor.last_id + 1, f"the archive anchor before event "
                                     f"{anchor.last_id + 1} does not match its HMAC")
            return result
        start_id, start_prev = anchor.last_id + 1, anchor.last_hash
        warnings.append(f"events 1..{anchor.last_id} were archived (last file {anchor.file_name}); "
                        "'onprem-label audit verify' on the server verifies the archive files too")
    valid = []
    for checkpoint in checkpoints or []:
        if checkpoint.valid(key):
            valid.append(checkpoint)
        else:
            warnings.append(f"a checkpoint line ({checkpoint.count} events, {checkpoint.at}) does not match "
                            "its HMAC: the checkpoint file was edited")
    if checkpoints is not None and not checkpoints and bad_checkpoint_lines == 0:
        warnings.append("no checkpoints were found: a cut-off tail could not be noticed "
                        "(is the checkpoint file where audit_checkpoint_file says?)")
    if bad_checkpoint_lines:
        warnings.append(f"{bad_checkpoint_lines} line(s) of the checkpoint file are not checkpoints")
    want = {c.count for c in valid if c.count >= start_id}
    seen_before: dict[int, str] = {}
    after = start_id - 1
    if since_checkpoint and want:
        newest = max(valid, key=lambda c: c.count)
        if newest.count >= start_id:
            problem, seen_before = _check_named_events(conn, key, sorted(want))
            if problem is not None:
                return VerifyResult(problem=problem, warnings=warnings, checkpoints=len(valid))
            if newest.count in seen_before:  # (else the checkpoint saw more than the log holds)
                gone = [i for i in sorted(want) if i not in seen_before]
                if gone:  # an event a checkpoint names is not there, though the newest one's is
                    return VerifyResult(problem=Problem("missing", gone[0], f"event {gone[0]}, which a "
                                                        "checkpoint names, is missing (deleted)"),
                                        warnings=warnings, checkpoints=len(valid))
                start_id, start_prev, after = newest.count + 1, newest.head, newest.count
    # Plain DB-API rows (SQLAlchemy's per-row processing would double the time of a million-event
    # walk); a server-side cursor on PostgreSQL, closed even when the walk stops at a bad event.
    sql = _RAW_ROWS_PG if conn.dialect.name == "postgresql" else _RAW_ROWS
    if after > 0:
        sql = sql.replace(" ORDER BY", f" WHERE id > {int(after)} ORDER BY")
    cursor = conn.exec_driver_sql(sql, execution_options={"stream_results": True, "yield_per": 10_000})
    try:
        result, seen = walk(_raw_events(cursor), key, start_id=start_id, start_prev=start_prev, want=want)
    finally:
        cursor.close()
    seen = {**seen_before, **seen}
    result.warnings = warnings
    if result.problem is None and result.events == 0:
        if after in seen_before:  # nothing after the newest checkpoint: the chain ends in its event
            result.last_id, result.head = after, seen_before[after]
        elif anchor is not None:
            result.last_id, result.head = anchor.last_id, anchor.last_hash
    if result.problem is None:
        result.problem = _check_checkpoints(valid, result, seen, anchor)
    result.checkpoints = len(valid)
    if result.problem is None and len(valid) != len(checkpoints or []):
        result.problem = Problem("checkpoint", None, "the checkpoint file holds lines not written with the audit key")
    return result


def verify_chain(conn: Connection, chain, *, since_checkpoint: bool = False) -> VerifyResult:
    """verify_database with the checkpoints of `chain` (an audit.chain.AuditChain), read first."""
    checkpoints, bad = chain.checkpoints.read() if chain.checkpoints is not None else (None, 0)
    return verify_database(conn, chain.key, checkpoints, bad, since_checkpoint=since_checkpoint)


def verify_and_record(session, engine, chain, *, actor=None, actor_name: str | None = None,
                      context=None, now=None, extra: dict | None = None) -> VerifyResult:
    """Walk the chain in one snapshot, then record the verification (audit:verify) and commit.

    `extra`: a further check of the caller's (the CLI's archive files) run before the event is
    written, as `extra(result)`, which may set `result.problem`.
    """
    from onprem_label.audit.actions import AuditAction
    from onprem_label.audit.record import CONSOLE, record
    from onprem_label.db.engine import read_connection

    with read_connection(engine, snapshot=True) as conn:
        result = verify_chain(conn, chain)
    if extra is not None:
        extra(result)
    record(session, AuditAction.AUDIT_VERIFY, actor=actor, actor_name=actor_name, object_type="audit",
           outcome="success" if result.ok else "failure",
           details={"events": result.events, "problem": result.as_dict()["problem"]},
           context=context or CONSOLE, now=now)
    session.commit()
    return result


def _check_checkpoints(valid: list[Checkpoint], result: VerifyResult, seen: dict[int, str], anchor) -> Problem | None:
    """The first checkpoint the chain contradicts, as a problem."""
    for checkpoint in sorted(valid, key=lambda c: c.count):
        if checkpoint.count > result.last_id:
            return Problem("truncated", result.last_id + 1,
                           f"the log ends at event {result.last_id}, but the checkpoint of {checkpoint.at} saw "
                           f"{checkpoint.count} events: events {result.last_id + 1}..{checkpoint.count} were cut off")
        if anchor is not None and checkpoint.count == anchor.last_id:
            if checkpoint.head != anchor.last_hash:
                return Problem("truncated", checkpoint.count, f"the archive anchor disagrees with the "
                               f"checkpoint of {checkpoint.at} at event {checkpoint.count}")
        elif checkpoint.count in seen and seen[checkpoint.count] != checkpoint.head:
            return Problem("truncated", checkpoint.count, f"event {checkpoint.count} is not the event the checkpoint "
                           f"of {checkpoint.at} saw (the tail was cut off and rewritten)")
    return None


def _check_named_events(conn: Connection, key: bytes, ids: list[int]) -> tuple[Problem | None, dict[int, str]]:
    """The events at `ids` (checkpoint positions) that exist, each checked against its own HMAC.

    Returns the first edited one as a problem, and the hashes of those present (a missing one is
    for _check_checkpoints to name: the log was cut off before it).
    """
    sql = _RAW_ROWS_PG if conn.dialect.name == "postgresql" else _RAW_ROWS
    seen: dict[int, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ",".join(str(int(i)) for i in ids[start:start + 500])
        for event in _raw_events(conn.exec_driver_sql(sql.replace(" ORDER BY", f" WHERE id IN ({chunk}) ORDER BY"))):
            row_id, prev, digest = int(event["id"]), event["prev_hash"], event["hash"]
            if not (is_hex64(prev) and is_hex64(digest)) or not hmac.compare_digest(
                    digest, hmac.digest(key, canonical(event) + b"\n" + prev.encode("ascii"), "sha256").hex()):
                return Problem("edited", row_id, f"event {row_id} does not match its HMAC (a field was edited, "
                               "the event forged, or the chain rebuilt without the audit key)"), seen
            seen[row_id] = digest
    return None, seen


def _raw_events(rows) -> Iterator[dict[str, Any]]:
    """Events from raw rows of _RAW_ROWS: the time spelled as in the chain, details parsed."""
    names = _RAW_NAMES
    for raw in rows:
        event = dict(zip(names, raw))
        ts, details = event["ts"], event["details"]
        if isinstance(ts, str):
            if not ts.endswith("Z"):  # (PostgreSQL's to_char spelled it already)
                # SQLite: 'YYYY-MM-DD HH:MM:SS.ffffff', as SQLAlchemy stores it
                event["ts"] = (ts[:10] + "T" + ts[11:23] + "Z") if len(ts) == 26 \
                    else format_ts(datetime.fromisoformat(ts))
        elif ts is not None:
            event["ts"] = format_ts(ts)
        if isinstance(details, (str, bytes)):
            try:
                event["details"] = json.loads(details)
            except ValueError:
                event["details"] = {"unreadable": str(details)[:100]}  # edited: the HMAC will say so
        yield event


_RAW_NAMES = (*FIELDS, *CHAIN_FIELDS)
_RAW_ROWS = f"SELECT {', '.join(_RAW_NAMES)} FROM audit_events ORDER BY id"
# PostgreSQL spells the time and the details as text itself (on its own core, while this one
# hashes): the driver's timestamp and JSONB loaders would cost more than json.loads here.
_RAW_ROWS_PG = _RAW_ROWS.replace(
    "ts,", "to_char(date_trunc('milliseconds', ts), 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),", 1).replace(
    "details,", "details::text,", 1)
_HEX64 = re.compile("[0-9a-f]{64}")
_ANCHOR = AuditAnchor.__table__.select().order_by(AuditAnchor.__table__.c.last_id.desc()).limit(1)
