"""The hash chain: each event's HMAC covers its canonical bytes and the hash of the event before it.

`hash = HMAC-SHA-256(audit key, canonical(event) + "\\n" + prev_hash)`. The audit key derives from the
keyring's root key, so someone with the database alone can neither forge an event nor rebuild
the chain after editing one. Events are queued by `record` and sealed at COMMIT (`seal_pending`,
a `before_commit` hook), in one short critical section per transaction:

- on PostgreSQL a transaction-scoped advisory lock serialises the appends of every process on
  the database; on SQLite the transaction already holds the database's write lock (BEGIN
  IMMEDIATE), which is exclusive across processes;
- ids are assigned here as head + 1, so the chain's ids have no gaps (a gap is a deleted event);
- sealing last means the chain lock is the last lock a transaction takes, so it can never be part
  of a deadlock with row locks taken earlier (a lease's FOR UPDATE).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from sqlalchemy import Connection, event, insert, text
from sqlalchemy.orm import Session

from onprem_label.db.models import AuditAnchor, AuditEvent

FORMAT_VERSION = 1
GENESIS_HASH = "0" * 64
AUDIT_KEY_PURPOSE = "audit-chain"
# pg_advisory_xact_lock key: the low 63 bits of sha256("onprem-label audit chain").
PG_CHAIN_LOCK = int.from_bytes(hashlib.sha256(b"onprem-label audit chain").digest()[:8], "big") >> 1
PENDING_KEY = "onprem_label.audit_pending"
log = logging.getLogger("onprem_label.audit")
CHAIN_KEY = "onprem_label.audit_chain"

# Canonical field order; never reorder (a new field means a new FORMAT_VERSION).
FIELDS = ("id", "ts", "actor_id", "actor_name", "actor_role", "action", "object_type", "object_id",
          "study_uid", "outcome", "client_addr", "user_agent", "request_id", "details")
CHAIN_FIELDS = ("prev_hash", "hash")


class AuditKeyMissing(RuntimeError):
    """Events were recorded in a session that cannot seal them (no audit key configured)."""


def format_ts(ts: datetime) -> str:
    """UTC ISO 8601 with milliseconds and 'Z' — the one spelling of a time in the chain."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(timezone.utc).replace(tzinfo=None)
    return ts.isoformat(timespec="milliseconds") + "Z"  # cuts (never rounds) the microseconds


def to_millis(ts: datetime) -> datetime:
    """`ts` cut to whole milliseconds, as stored (so a read-back row hashes the same)."""
    return ts.replace(microsecond=ts.microsecond // 1000 * 1000)


def canonical(row: dict[str, Any]) -> bytes:
    """The bytes an event's HMAC covers (every field but the chain fields), as compact sorted JSON.

    Written out field by field (the order of FIELDS) with one reused encoder: verification runs
    this a million times.
    """
    ts, actor_id = row["ts"], row["actor_id"]
    return _ENCODER.encode([
        FORMAT_VERSION, row["id"], ts if isinstance(ts, str) else format_ts(ts),
        None if actor_id is None else int(actor_id), row["actor_name"] or "", row["actor_role"] or "",
        row["action"] or "", row["object_type"] or "", row["object_id"] or "", row["study_uid"] or "",
        row["outcome"] or "", row["client_addr"] or "", row["user_agent"] or "", row["request_id"] or "",
        row["details"] or {}]).encode()


_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def event_dict(row: Any) -> dict[str, Any]:
    """One event as plain data with its time spelled as in the chain (exports, API, syslog)."""
    data = {name: row[name] for name in (*FIELDS, *CHAIN_FIELDS)}
    data["ts"] = format_ts(data["ts"]) if not isinstance(data["ts"], str) else data["ts"]
    data["details"] = data["details"] or {}
    data["study_uid"] = data["study_uid"] or ""
    return data


def event_hash(key: bytes, row: dict[str, Any], prev_hash: str) -> str:
    """HMAC-SHA-256 of the event's canonical bytes and the previous event's hash, hex."""
    return hmac.digest(key, canonical(row) + b"\n" + prev_hash.encode("ascii"), "sha256").hex()


def checkpoint_mac(key: bytes, count: int, head: str, at: str) -> str:
    """The HMAC that makes a checkpoint line unforgeable without the audit key."""
    return hmac.digest(key, f"checkpoint|{count}|{head}|{at}".encode(), "sha256").hex()


def anchor_mac(key: bytes, first_id: int, last_id: int, last_hash: str, file_name: str, file_sha256: str) -> str:
    """The HMAC of an archive anchor: which file holds events first_id..last_id, and where the chain goes on."""
    message = json.dumps(["anchor", first_id, last_id, last_hash, file_name, file_sha256], separators=(",", ":"))
    return hmac.digest(key, message.encode(), "sha256").hex()


@dataclass
class AuditChain:
    """What a session needs to seal its events: the key, the checkpoint log, forwarders."""

    key: bytes = field(repr=False)
    checkpoints: Any = None  # audit.checkpoints.CheckpointLog, or None (tests, tools)
    checkpoint_every: int = 1000
    checkpoint_seconds: float = 600.0  # also at least this often while events are written
    # Called after COMMIT with the sealed events (syslog forwarding); must never raise or block.
    after_commit: list[Callable[[list[dict]], None]] = field(default_factory=list)
    forwarder: Any = None  # audit.syslog.SyslogForwarder when forwarding is on

    def checkpoint_due(self, first_id: int, last_id: int) -> bool:
        """True when a commit of events first_id..last_id should leave a checkpoint."""
        every, seconds = self.checkpoint_every, self.checkpoint_seconds
        crossed = every > 0 and last_id // every != (first_id - 1) // every
        stale = seconds > 0 and time.monotonic() - self.checkpoints.last_written >= seconds
        return crossed or stale


class LazyAuditChain:
    """An AuditChain made on first use: CLI commands that write no event never open the keyring."""

    def __init__(self, make: Callable[[], AuditChain]) -> None:
        self._make, self._chain, self._lock = make, None, threading.Lock()

    def get(self) -> AuditChain:
        """The chain, made once."""
        with self._lock:
            if self._chain is None:
                self._chain = self._make()
            return self._chain


def chain_of(session: Session) -> AuditChain:
    """The AuditChain configured on `session` (sessionmaker info), or AuditKeyMissing."""
    chain = session.info.get(CHAIN_KEY)
    if isinstance(chain, LazyAuditChain):
        chain = chain.get()
    if chain is None:
        raise AuditKeyMissing("this session has no audit key: audit events cannot be sealed")
    return chain


def queue(session: Session, row: dict[str, Any]) -> None:
    """Add an unsealed event to the session's transaction; it is sealed and written at COMMIT.

    The event is tagged with the savepoint it was recorded in, so rolling that savepoint back
    drops it and nothing else.
    """
    chain_of(session)  # the key first: a passphrase prompt must never wait inside a write transaction
    session.connection()  # begin now: on SQLite the write lock, the same moment as before the chain
    row = {**row, "details": stable_json(row["details"])}
    session.info.setdefault(PENDING_KEY, []).append((session.get_nested_transaction(), row))


def stable_json(value: Any) -> Any:
    """`value` as JSON that reads back identical from SQLite's JSON and PostgreSQL's JSONB.

    JSONB rewrites some numbers (1e16 comes back an integer, -0.0 as 0.0) and reorders keys that
    were not strings; NUL cannot be stored at all. An event whose stored details differ from the
    hashed ones would fail verification for ever, so floats become their exact decimal text,
    keys become strings and NUL becomes U+FFFD before the event is hashed.
    """
    if isinstance(value, dict):
        return {str(k).replace("\x00", "\ufffd"): stable_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [stable_json(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if value is None or isinstance(value, (bool, int)):
        return value
    return str(value)


def head(conn: Connection) -> tuple[int, str]:
    """(id, hash) of the chain's last event; after an archive of everything, its anchor; else genesis."""
    last = conn.execute(_HEAD).first()
    if last is not None:
        return int(last[0]), last[1]
    anchor = conn.execute(_LAST_ANCHOR).first()
    if anchor is not None:
        return int(anchor[0]), anchor[1]
    return 0, GENESIS_HASH


def lock_chain(conn: Connection) -> None:
    """Serialise appends until this transaction ends (SQLite: its write lock already does)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_CHAIN_LOCK})


def append(conn: Connection, key: bytes, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seal `rows` onto the chain's head and insert them, in the caller's transaction; the rows back."""
    lock_chain(conn)
    last_id, last_hash = head(conn)
    sealed = []
    for row in rows:
        last_id += 1
        row = {**row, "id": last_id, "prev_hash": last_hash}
        row["hash"] = last_hash = event_hash(key, row, row["prev_hash"])
        sealed.append(row)
    if sealed:
        conn.execute(_INSERT, sealed)
    return sealed


def seal_pending(session: Session) -> list[dict[str, Any]]:
    """Seal and insert the events queued in `session` (the before_commit hook calls this)."""
    pending = session.info.pop(PENDING_KEY, None)
    if not pending:
        return []
    chain = chain_of(session)
    sealed = append(session.connection(), chain.key, [row for _, row in pending])
    session.info.setdefault(_SEALED_KEY, []).extend(sealed)
    return sealed


def install_session_hooks() -> None:
    """Register the Session hooks once per process (idempotent)."""
    if event.contains(Session, "before_commit", _before_commit):
        return
    event.listen(Session, "before_commit", _before_commit)
    event.listen(Session, "after_commit", _after_commit)
    event.listen(Session, "after_soft_rollback", _after_soft_rollback)


def _before_commit(session: Session) -> None:
    if session.in_nested_transaction() or not session.info.get(PENDING_KEY):
        return  # a savepoint released: events are sealed only by the outermost COMMIT
    # Flush first: the ORM's own UPDATEs take their row locks before the chain lock, never under it.
    session.flush()
    seal_pending(session)


def _after_commit(session: Session) -> None:
    sealed = session.info.pop(_SEALED_KEY, None)
    if not sealed:
        return
    chain = chain_of(session)
    # The events are committed: nothing here may fail the request that wrote them.
    if chain.checkpoints is not None:
        try:
            if chain.checkpoint_due(sealed[0]["id"], sealed[-1]["id"]):
                chain.checkpoints.write(sealed[-1]["id"], sealed[-1]["hash"])
        except OSError:
            log.exception("audit checkpoint not written (the events are committed; the next one retries)")
    for hook in chain.after_commit:
        try:
            hook(sealed)
        except Exception:  # a forwarder's bug must not turn a committed change into a 500
            log.exception("audit after-commit hook failed")


def _after_soft_rollback(session: Session, previous_transaction) -> None:
    if previous_transaction.parent is None:  # the whole transaction: its events go with it
        session.info.pop(PENDING_KEY, None)
        session.info.pop(_SEALED_KEY, None)
    elif previous_transaction.nested:  # a savepoint: only the events recorded inside it
        pending = session.info.get(PENDING_KEY)
        if pending:
            pending[:] = [(tag, row) for tag, row in pending if not _inside(tag, previous_transaction)]


def _inside(tag, savepoint) -> bool:
    """True when a savepoint `tag` is `savepoint` or nested in it."""
    while tag is not None:
        if tag is savepoint:
            return True
        tag = tag.parent
    return False


def seal_legacy(conn: Connection, key: bytes) -> int:
    """Migration 0005: chain the events written before the chain existed, renumbered without gaps.

    Runs before the append-only triggers exist. Ascending order makes every new id <= its old
    one, so no renumbering UPDATE meets a row not yet moved.
    """
    table = _TABLE
    columns = [table.c[name] for name in FIELDS]
    rows = [dict(r._mapping) for r in conn.execute(table.select().with_only_columns(*columns).order_by(table.c.id))]
    prev = GENESIS_HASH
    for number, row in enumerate(rows, start=1):
        old_id, row["id"] = row["id"], number
        digest = event_hash(key, row, prev)
        conn.execute(table.update().where(table.c.id == old_id).values(id=number, prev_hash=prev, hash=digest))
        prev = digest
    return len(rows)


def attach(maker, chain: AuditChain | LazyAuditChain) -> None:
    """Make every session of `maker` seal its audit events with `chain`."""
    install_session_hooks()
    maker.configure(info={CHAIN_KEY: chain})


def legacy_sealer(key: bytes) -> Callable[[Connection], int]:
    """The `audit_seal` callable that db.migrate.upgrade hands to revision 0005."""
    return lambda conn: seal_legacy(conn, key)


def audit_key(keyring) -> bytes:
    """The audit key of a keyring (derived from its root key: unchanged by master key rotation)."""
    return keyring.purpose_key(AUDIT_KEY_PURPOSE)


def make_chain(keyring, checkpoint_path: Path | None = None, every: int = 1000,
               seconds: float = 600.0) -> AuditChain:
    """An AuditChain for a data directory's keyring and checkpoint file."""
    from onprem_label.audit.checkpoints import CheckpointLog

    key = audit_key(keyring)
    checkpoints = CheckpointLog(checkpoint_path, key) if checkpoint_path is not None else None
    return AuditChain(key=key, checkpoints=checkpoints, checkpoint_every=every, checkpoint_seconds=seconds)


_SEALED_KEY = "onprem_label.audit_sealed"
_TABLE = AuditEvent.__table__
_INSERT = insert(_TABLE)
_HEAD = _TABLE.select().with_only_columns(_TABLE.c.id, _TABLE.c.hash).order_by(_TABLE.c.id.desc()).limit(1)
_ANCHORS = AuditAnchor.__table__
_LAST_ANCHOR = (_ANCHORS.select().with_only_columns(_ANCHORS.c.last_id, _ANCHORS.c.last_hash)
                .order_by(_ANCHORS.c.last_id.desc()).limit(1))
