"""Searching the audit trail: filters from query parameters, newest first, keyset pages."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping

from sqlalchemy import Connection, Select, func, or_, select

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.chain import CHAIN_FIELDS, FIELDS, event_dict
from onprem_label.db.models import AuditEvent

MAX_PAGE = 500
DEFAULT_PAGE = 50
OUTCOMES = ("success", "denied", "failure")


class FilterError(ValueError):
    """A search parameter is malformed; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class AuditFilter:
    """What an auditor asked for; every field optional. `until` is exclusive."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    action: str | None = None
    object_type: str | None = None
    object_id: str | None = None
    outcome: str | None = None

    def clauses(self) -> list:
        """The WHERE clauses of this filter."""
        c = _TABLE.c
        out = []
        if self.since is not None:
            out.append(c.ts >= self.since)
        if self.until is not None:
            out.append(c.ts < self.until)
        if self.actor:
            # Failed logins keep the name as typed; SQLite's lower() folds ASCII only, so the exact
            # spelling matches too.
            out.append(or_(c.actor_name == self.actor, func.lower(c.actor_name) == self.actor.lower()))
        if self.action:
            # "task:" means every task action; a whole name means that one.
            out.append(c.action.startswith(self.action, autoescape=True) if self.action.endswith(":")
                       else c.action == self.action)
        if self.object_type:
            out.append(c.object_type == self.object_type)
        if self.object_id:
            out.append(c.object_id == self.object_id)
        if self.outcome:
            out.append(c.outcome == self.outcome)
        return out

    def as_dict(self) -> dict[str, str]:
        """The filter as it would be written in a query string (times in ISO 8601)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        return out

    @property
    def empty(self) -> bool:
        """True when nothing is filtered (the export is the whole chain, so every link is checked)."""
        return not self.as_dict()


def parse_time(field: str, raw: str) -> datetime:
    """ISO 8601 date or date-time; without a zone it is UTC."""
    try:
        value = datetime.fromisoformat(raw.strip())
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    except (ValueError, OverflowError):  # OverflowError: a zone that pushes year 9999 over the edge
        raise FilterError(field, f"'{field}' must be an ISO 8601 date or date-time, e.g. 2026-12-01T08:00") from None


def parse_filter(args: Mapping[str, str]) -> AuditFilter:
    """An AuditFilter from query parameters; FilterError names the first bad one."""
    values: dict[str, Any] = {}
    for name in ("since", "until"):
        if args.get(name, "").strip():
            values[name] = parse_time(name, args[name])
    for name, limit in (("actor", 64), ("action", 64), ("object_type", 32), ("object_id", 64)):
        # Not stripped or cleaned: a hostile name (CR/LF and all) is exactly what an auditor may look for.
        raw = args.get(name, "")
        if raw.strip():
            if len(raw) > limit:
                raise FilterError(name, f"'{name}' must be at most {limit} characters")
            values[name] = raw
    action = values.get("action")
    if action and not action.endswith(":") and action not in _ACTIONS:
        raise FilterError("action", "'action' must be a known action (e.g. image:read) or a prefix ending "
                                    "in ':' (e.g. task:)")
    outcome = args.get("outcome", "").strip()
    if outcome:
        if outcome not in OUTCOMES:
            raise FilterError("outcome", f"'outcome' must be one of {', '.join(OUTCOMES)}")
        values["outcome"] = outcome
    flt = AuditFilter(**values)
    if flt.since and flt.until and flt.until <= flt.since:
        raise FilterError("until", "'until' must be later than 'since'")
    return flt


def parse_page(args: Mapping[str, str]) -> tuple[int | None, int]:
    """(before id, page size) from `before` and `limit`; FilterError when malformed."""
    before = _positive(args, "before")
    limit = _positive(args, "limit") or DEFAULT_PAGE
    if limit > MAX_PAGE:
        raise FilterError("limit", f"'limit' must be at most {MAX_PAGE}")
    return before, limit


def search(conn: Connection, flt: AuditFilter, *, before: int | None = None,
           limit: int = DEFAULT_PAGE) -> tuple[list[dict], int | None]:
    """One page of matching events, newest first, and the `before` cursor of the next page (or None)."""
    query = select(*_COLUMNS).where(*flt.clauses())
    if before is not None:
        query = query.where(_TABLE.c.id < before)
    rows = [event_dict(r._mapping) for r in conn.execute(query.order_by(_TABLE.c.id.desc()).limit(limit + 1))]
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1]["id"] if more and rows else None)


def matching(flt: AuditFilter, *, up_to: int) -> Select:
    """The query of every matching event with id <= `up_to`, oldest first (exports stream it)."""
    return select(*_COLUMNS).where(*flt.clauses(), _TABLE.c.id <= up_to).order_by(_TABLE.c.id)


def count_matching(conn: Connection, flt: AuditFilter, *, up_to: int) -> int:
    """How many events an export of `flt` up to event `up_to` holds."""
    return conn.execute(select(func.count()).select_from(_TABLE).where(*flt.clauses(), _TABLE.c.id <= up_to)).scalar()


def stream(conn: Connection, flt: AuditFilter, *, up_to: int, batch: int = 5000) -> Iterator[dict]:
    """Every matching event up to `up_to`, oldest first, fetched `batch` rows at a time."""
    result = conn.execute(matching(flt, up_to=up_to),
                          execution_options={"stream_results": True, "yield_per": batch})
    try:
        for row in result:
            yield event_dict(row._mapping)
    finally:
        result.close()  # also when the reader stops early (a client that went away)


def _positive(args: Mapping[str, str], name: str) -> int | None:
    raw = args.get(name, "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < 2**31:  # isdigit alone takes '²' 
        raise FilterError(name, f"'{name}' must be a positive whole number")
    return int(raw)


_TABLE = AuditEvent.__table__
_COLUMNS = [_TABLE.c[name] for name in (*FIELDS, *CHAIN_FIELDS)]
_ACTIONS = frozenset(a.value for a in AuditAction)
