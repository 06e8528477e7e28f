"""The disk and clock checks: free space where the data lives, and a clock that did not go back."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection, func, select, text

from onprem_label.config import Settings
from onprem_label.db.models import AuditEvent
from onprem_label.health.findings import OK, PROBLEM, WARNING, Finding

# Several servers on one PostgreSQL stamp events with their own clocks: allow them a little skew.
CLOCK_BACK_TOLERANCE = timedelta(seconds=5)
# Further than this past the newest event is more likely a clock set years ahead than a site idle
# for so long; events stamped then would look, once the clock is fixed, like a clock gone back.
CLOCK_AHEAD_LIMIT = timedelta(days=730)
DATABASE_SKEW_LIMIT = timedelta(seconds=30)
MIB = 1 << 20


def check_disk(settings: Settings) -> list[Finding]:
    """Free space on the data directory's filesystem (and the checkpoint file's, when elsewhere)."""
    threshold = settings.doctor_min_free_disk_mb
    places = [("data directory", settings.data_path)]
    checkpoint_dir = settings.audit_checkpoint_path.parent
    if checkpoint_dir.exists() and settings.data_path.exists() and \
            checkpoint_dir.stat().st_dev != settings.data_path.stat().st_dev:
        places.append(("checkpoint file", checkpoint_dir))
    out = []
    for what, path in places:
        usage = shutil.disk_usage(_existing(path))
        free = usage.free // MIB
        share = 100 * usage.free / usage.total if usage.total else 0.0
        if free < threshold:
            out.append(Finding("disk", WARNING, f"{free} MiB free on the {what}'s filesystem ({share:.0f}%), "
                               f"below doctor_min_free_disk_mb = {threshold}"))
        else:
            out.append(Finding("disk", OK, f"{free} MiB free on the {what}'s filesystem ({share:.0f}%)"))
    return out


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing parent (a data directory not made yet)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_clock(conn: Connection, now: datetime) -> list[Finding]:
    """The clock is not behind the newest audit event nor absurdly far past it; on PostgreSQL, agrees with the server."""
    out = []
    newest = conn.execute(select(func.max(AuditEvent.ts))).scalar()
    if newest is not None:
        newest = AuditEvent.__table__.c.ts.type.process_result_value(newest, conn.dialect) \
            if newest.tzinfo is None else newest
    if newest is not None and now < newest - CLOCK_BACK_TOLERANCE:
        out.append(Finding("clock", PROBLEM, f"the clock ({_spell(now)}) is behind the newest audit event "
                           f"({_spell(newest)}) by {_span(newest - now)}: it was set back, and new events would be "
                           "stamped before older ones; set the time right (NTP) before going on"))
    elif newest is not None and now - newest > CLOCK_AHEAD_LIMIT:
        out.append(Finding("clock", WARNING, f"the clock ({_spell(now)}) is {_span(now - newest)} past the newest "
                           f"audit event ({_spell(newest)}): is it set far ahead?"))
    if conn.dialect.name == "postgresql":
        # clock_timestamp(), not now(): now() is when the (snapshot) transaction began.
        server = conn.execute(text("SELECT clock_timestamp()")).scalar()
        skew = abs(server - now)
        if skew > DATABASE_SKEW_LIMIT:
            out.append(Finding("clock", WARNING, f"the clock differs from the database server's by {_span(skew)} "
                               f"({_spell(now)} here, {_spell(server)} there); servers on one database must agree"))
    if not out:
        detail = _spell(now) + (f", after the newest audit event ({_spell(newest)})" if newest else "")
        if conn.dialect.name == "postgresql":
            detail += "; agrees with the database server"
        out.append(Finding("clock", OK, detail))
    return out


def _spell(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 120:
        return f"{round(seconds)} s"
    if seconds < 7200:
        return f"{round(seconds / 60)} min"
    if seconds < 172800:
        return f"{round(seconds / 3600)} h"
    return f"{round(seconds / 86400)} days"
