"""Retention: `audit archive --before DATE` moves the chain's oldest events into a sealed file.

The application never deletes events; this is the one sanctioned way out of the table. The
archived prefix is written as JSON lines, encrypted in AES-256-GCM chunks (the blob format's
nonce scheme: counter + last-chunk flag, so a cut or reordered file fails to open) under a key
derived from the audit key, and synced; only then are the rows deleted, in the same transaction
that leaves an anchor (last id, last hash, the file's SHA-256, an HMAC) where the chain goes on.
The file still verifies: `verify_archive` walks it as the chain's prefix and checks it ends in
the anchor. The append-only triggers are lifted for that one DELETE and restored before commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.chain import GENESIS_HASH, anchor_mac, chain_of, event_dict, head, lock_chain
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.audit.verify import Problem, VerifyResult, walk
from onprem_label.db.models import AuditAnchor, AuditEvent
from onprem_label.storage.blobstore import fsync_dir
from onprem_label.storage.format import IntegrityError, _hkdf, open_chunk, seal_chunk

MAGIC = b"OLAUDAR1"
SALT_BYTES = 16
CHUNK_BYTES = 1 << 20
ROWS_PER_FETCH = 10_000

# The append-only guard, as migration 0005 created it (kept identical to the revision's text).
_SQLITE_DROP = ("DROP TRIGGER audit_events_no_update", "DROP TRIGGER audit_events_no_delete")
_SQLITE_CREATE = (
    "CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events "
    "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END",
    "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
    "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END",
)
_PG_DISABLE = ("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update",)
_PG_ENABLE = ("ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update",)


class ArchiveError(Exception):
    """The archive could not be made or read (nothing to archive, a damaged file, a wrong key)."""


@dataclass(frozen=True)
class ArchiveReport:
    """What one archive run moved."""

    first_id: int
    last_id: int
    count: int
    path: Path
    file_sha256: str


@contextmanager
def guard_lifted(conn: Connection) -> Iterator[None]:
    """Inside the caller's transaction: the append-only triggers off, then on again.

    DDL is transactional on both databases, so a failure rolls the triggers back into place.
    """
    pg = conn.dialect.name == "postgresql"
    for statement in (_PG_DISABLE if pg else _SQLITE_DROP):
        conn.exec_driver_sql(statement)
    yield
    for statement in (_PG_ENABLE if pg else _SQLITE_CREATE):
        conn.exec_driver_sql(statement)


def archive_key(audit_key: bytes) -> bytes:
    """The key archive files are encrypted under (derived from the audit key)."""
    return _hkdf(audit_key, b"", b"onprem-label audit archive v1")


def write_archive(path: Path, key: bytes, rows: Iterator[dict]) -> str:
    """Encrypt `rows` as JSON lines into a new file at `path` (synced); its SHA-256, hex."""
    salt = os.urandom(SALT_BYTES)
    aead = AESGCM(_hkdf(archive_key(key), salt, b"chunks"))
    digest = hashlib.sha256()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        def emit(data: bytes) -> None:
            out.write(data)
            digest.update(data)

        emit(MAGIC + salt)
        index, pending = 0, bytearray()
        buffered: bytes | None = None  # one chunk held back: only the last one carries the flag
        for row in rows:
            pending += json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            while len(pending) >= CHUNK_BYTES:
                if buffered is not None:
                    sealed = seal_chunk(aead, salt, index, False, buffered)
                    emit(struct.pack(">I", len(sealed)) + sealed)
                    index += 1
                buffered, pending = bytes(pending[:CHUNK_BYTES]), pending[CHUNK_BYTES:]
        tail = [c for c in (buffered, bytes(pending)) if c is not None]
        for n, chunk in enumerate(tail):
            sealed = seal_chunk(aead, salt, index, n == len(tail) - 1, chunk)
            emit(struct.pack(">I", len(sealed)) + sealed)
            index += 1
        out.flush()
        os.fsync(out.fileno())
    fsync_dir(path.parent)
    return digest.hexdigest()


def read_archive(path: Path, key: bytes) -> Iterator[dict]:
    """The events of an archive file, in order; ArchiveError when it was altered, cut or the key is wrong."""
    with open(path, "rb") as f:
        start = f.read(len(MAGIC) + SALT_BYTES)
        if start[:len(MAGIC)] != MAGIC or len(start) != len(MAGIC) + SALT_BYTES:
            raise ArchiveError(f"{path.name} is not an onprem-label audit archive")
        salt = start[len(MAGIC):]
        aead = AESGCM(_hkdf(archive_key(key), salt, b"chunks"))
        index, rest, size = 0, b"", f.read(4)
        while size:
            if len(size) != 4:
                raise ArchiveError(f"{path.name} is cut short")
            sealed = f.read(struct.unpack(">I", size)[0])
            size = f.read(4)
            try:
                plain = open_chunk(aead, salt, index, not size, sealed)
            except IntegrityError:
                raise ArchiveError(f"{path.name}: chunk {index} fails authentication (altered, cut short, "
                                   "or another install's key)") from None
            index += 1
            lines = (rest + plain).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield json.loads(line)
        if index == 0 or rest:
            raise ArchiveError(f"{path.name} is cut short")


def archive_before(session: Session, before: datetime, folder: Path, *, now: datetime,
                   context: AuditContext = CONSOLE, actor_name: str = "console") -> ArchiveReport:
    """Move every event up to the last one older than `before` into a new archive file in `folder`.

    Commits. The archive is itself an event (audit:archive) on the chain that goes on.
    """
    chain = chain_of(session)
    conn = session.connection()
    lock_chain(conn)  # no append may slip in between the copy and the delete
    table = AuditEvent.__table__
    last_id = conn.execute(select(func.max(table.c.id)).where(table.c.ts < before)).scalar()
    anchor = conn.execute(select(AuditAnchor.__table__).order_by(AuditAnchor.__table__.c.last_id.desc())
                          .limit(1)).first()
    first_id = anchor.last_id + 1 if anchor is not None else 1
    if last_id is None or last_id < first_id:
        raise ArchiveError(f"no events before {before.isoformat()} are left in the database")
    last_hash = conn.execute(select(table.c.hash).where(table.c.id == last_id)).scalar_one()
    path = folder / f"audit-{first_id:010d}-{last_id:010d}.olaudit"
    # Options per statement: Connection.execution_options would change the session's connection for good.
    cursor = conn.execute(table.select().where(table.c.id.between(first_id, last_id)).order_by(table.c.id),
                          execution_options={"stream_results": True, "yield_per": ROWS_PER_FETCH})
    try:
        file_sha256 = write_archive(path, chain.key, (event_dict(r._mapping) for r in cursor))
    finally:
        cursor.close()
    result = verify_archive(path, chain.key, start_id=first_id,
                            start_prev=anchor.last_hash if anchor is not None else GENESIS_HASH)
    if not result.ok or result.last_id != last_id or result.head != last_hash:
        path.unlink()
        raise ArchiveError("the archive written does not read back as the events it should hold; "
                           "nothing was deleted")
    with guard_lifted(conn):
        conn.execute(delete(table).where(table.c.id <= last_id))
    conn.execute(insert(AuditAnchor.__table__).values(
        archived_at=now, first_id=first_id, last_id=last_id, last_hash=last_hash, file_name=path.name,
        file_sha256=file_sha256, mac=anchor_mac(chain.key, first_id, last_id, last_hash, path.name, file_sha256)))
    record(session, AuditAction.AUDIT_ARCHIVE, actor_name=actor_name, object_type="audit",
           object_id=f"{first_id}-{last_id}", details={"before": before.isoformat(), "events": last_id - first_id + 1,
                                                       "file": path.name, "sha256": file_sha256},
           context=context, now=now)
    session.commit()
    if chain.checkpoints is not None:
        with session.begin():
            count, digest = head(session.connection())
        chain.checkpoints.write(count, digest)
    return ArchiveReport(first_id, last_id, last_id - first_id + 1, path, file_sha256)


def verify_archive(path: Path, key: bytes, *, start_id: int = 1, start_prev: str = GENESIS_HASH) -> VerifyResult:
    """Walk an archive file as the stretch of the chain starting at `start_id`."""
    try:
        result, _ = walk(read_archive(path, key), key, start_id=start_id, start_prev=start_prev)
    except (ArchiveError, OSError, ValueError) as exc:  # altered, missing, or not JSON inside
        result = VerifyResult()
        result.problem = Problem("edited" if not isinstance(exc, FileNotFoundError) else "missing", start_id,
                                 f"archive {path.name}: {exc}")
    return result


def file_sha256(path: Path) -> str | None:
    """The SHA-256 of a file, hex (None when it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()

