"""The pay ledger: entries written when a task is accepted, per-person statements, and their CSV for payroll.

Money is Decimal throughout and stored as decimal text, so sums are exact on both databases.
A rate is rounded half-even to the project's `pay_decimals` places once, when an entry is
written; totals are exact sums of entries. Rejected work earns nothing until its task is
accepted; then the labeler is paid once per task and each review decision once. The labeler of a
hidden gold check or a test question is paid only when the project's `pay_gold` says so; reviewers
are paid for reviewing gold checks and spot checks as for any review (they cannot tell them apart).
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.export import neutralise, unneutralise
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import User
from onprem_label.db.quality import PayEntry, WorkLog
from onprem_label.workflow.settings import ProjectSettings
from onprem_label.workflow.taskrows import REVIEWS, TaskRow

ENTRIES, WORK = PayEntry.__table__, WorkLog.__table__


def money(value: str | Decimal, decimals: int) -> Decimal:
    """A decimal rounded half-even to `decimals` places (the one rounding rule of the ledger)."""
    return Decimal(value).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_EVEN)


def pay_for_acceptance(db: Session, task: TaskRow, settings: ProjectSettings, *, now: datetime,
                       actor: User | None = None, context: AuditContext = CONSOLE) -> list[dict]:
    """Write the entries an accepted task earns (none twice, none without a currency); audited."""
    if not settings.pay_currency or task.purpose == "qualification" and not settings.pay_gold:
        return []
    conn = db.connection()
    if conn.execute(select(ENTRIES.c.id).where(ENTRIES.c.task_id == task.id).limit(1)).first() is not None:
        return []  # paid already: acceptance is final, but the ledger is the last guard against paying twice
    label_kind = "label" if task.purpose == "work" else "gold"
    # A spot check pays its reviewer only; a hidden gold check pays its reviewers (who review it as
    # any task, unknowing) and its labeler only when pay_gold says so.
    paid_labeler = task.purpose == "work" or (task.purpose in ("gold", "qualification") and settings.pay_gold)
    lines = []
    if task.labeler_id is not None and paid_labeler:
        lines.append((task.labeler_id, label_kind, settings.pay_label_rate))
    reviewers = conn.execute(select(REVIEWS.c.reviewer_id).where(REVIEWS.c.task_id == task.id,
                                                                 REVIEWS.c.reviewer_id.is_not(None))
                             .order_by(REVIEWS.c.id)).scalars().all()
    lines += [(reviewer, "review", settings.pay_review_rate) for reviewer in reviewers]
    entries = [{"project_id": task.project_id, "user_id": user_id, "task_id": task.id, "kind": kind,
                "amount": str(money(rate, settings.pay_decimals)), "rate": rate, "currency": settings.pay_currency,
                "created_at": now} for user_id, kind, rate in lines]
    if entries:
        conn.execute(insert(ENTRIES), entries)
        record(db, AuditAction.PAY_ENTRY, actor=actor, object_type="task", object_id=task.id,
               details={"project_id": task.project_id, "currency": settings.pay_currency,
                        "entries": [{"user_id": e["user_id"], "kind": e["kind"], "amount": e["amount"]}
                                    for e in entries]}, context=context, now=now)
    return entries


@dataclass(frozen=True)
class Statement:
    """One person's pay in one project over [start, end): counts and amounts per kind, time, hourly rate."""

    project_id: int
    user_id: int
    username: str
    start: str
    end: str
    currency: str
    label_tasks: int
    label_amount: str
    reviews: int
    review_amount: str
    gold_tasks: int
    gold_amount: str
    total: str
    active_seconds: int
    effective_hourly: str  # "" when no active time was logged
    minimum_hourly: str
    under_minimum: bool


def statements(db: Session, project_id: int, settings: ProjectSettings, *, start: datetime,
               end: datetime) -> list[Statement]:
    """Every person with pay or logged work in the project over [start, end), by username."""
    in_period = (ENTRIES.c.project_id == project_id, ENTRIES.c.created_at >= start, ENTRIES.c.created_at < end)
    amounts: dict[int, dict[str, list]] = {}
    for user_id, kind, amount in db.execute(select(ENTRIES.c.user_id, ENTRIES.c.kind, ENTRIES.c.amount)
                                            .where(*in_period)):
        amounts.setdefault(user_id, {}).setdefault(kind, []).append(Decimal(amount))
    seconds = dict(db.execute(select(WORK.c.user_id, func.sum(WORK.c.seconds))
                              .where(WORK.c.project_id == project_id, WORK.c.ended_at >= start, WORK.c.ended_at < end,
                                     WORK.c.user_id.is_not(None)).group_by(WORK.c.user_id)).all())
    people = set(amounts) | set(seconds)
    names = dict(db.execute(select(User.id, User.username).where(User.id.in_(people))).all()) if people else {}
    out = [_statement(project_id, user_id, names.get(user_id, f"user {user_id}"), amounts.get(user_id, {}),
                      int(seconds.get(user_id) or 0), settings, start, end) for user_id in people]
    return sorted(out, key=lambda s: (s.username, s.user_id))


def as_seen_by_worker(row: Statement) -> Statement:
    """A statement as its own person sees it: gold lines folded into label lines, so the statement
    cannot point at which of their tasks were hidden gold checks."""
    if not row.gold_tasks:
        return row
    label = Decimal(row.label_amount) + Decimal(row.gold_amount)
    return replace(row, label_tasks=row.label_tasks + row.gold_tasks, label_amount=str(label), gold_tasks=0,
                   gold_amount=str(Decimal(row.gold_amount) * 0))


def _statement(project_id: int, user_id: int, username: str, kinds: dict[str, list], seconds: int,
               settings: ProjectSettings, start: datetime, end: datetime) -> Statement:
    places = settings.pay_decimals

    def total(values) -> str:
        return str(money(sum(values, Decimal(0)), places))

    every = [v for values in kinds.values() for v in values]
    minimum = money(settings.pay_minimum_hourly, places)
    hourly = money(sum(every, Decimal(0)) * 3600 / seconds, places) if seconds else None
    return Statement(project_id=project_id, user_id=user_id, username=username, start=start.isoformat(),
                     end=end.isoformat(), currency=settings.pay_currency,
                     label_tasks=len(kinds.get("label", [])), label_amount=total(kinds.get("label", [])),
                     reviews=len(kinds.get("review", [])), review_amount=total(kinds.get("review", [])),
                     gold_tasks=len(kinds.get("gold", [])), gold_amount=total(kinds.get("gold", [])),
                     total=total(every), active_seconds=seconds, effective_hourly=str(hourly) if hourly is not None else "",
                     minimum_hourly=str(minimum), under_minimum=bool(hourly is not None and minimum > 0 and hourly < minimum))


COLUMNS = [f.name for f in fields(Statement)]


def statements_csv(rows: list[Statement]) -> str:
    """The statements as CSV for payroll: a header line, then one line per person (cells never formulas)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for row in rows:
        values = asdict(row)
        writer.writerow([neutralise(str(values[name]).lower() if isinstance(values[name], bool) else str(values[name]))
                         for name in COLUMNS])
    return out.getvalue()


def read_statements_csv(text: str) -> list[Statement]:
    """Statements back from `statements_csv` output (what a payroll import would read)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    if header != COLUMNS:
        raise ValueError("not a statements CSV: unexpected header")
    types = {f.name: f.type for f in fields(Statement)}
    rows = []
    for cells in reader:
        values = {}
        for name, cell in zip(COLUMNS, cells, strict=True):
            cell = unneutralise(cell)
            kind = types[name]
            values[name] = int(cell) if kind == "int" else (cell == "true") if kind == "bool" else cell
        rows.append(Statement(**values))
    return rows


def record_statement_read(db: Session, project_id: int, actor: User, start: datetime, end: datetime, people: int,
                          fmt: str, *, now: datetime, context: AuditContext = CONSOLE) -> None:
    """Audit a read of pay statements (who looked at whose pay)."""
    record(db, AuditAction.PAY_STATEMENT, actor=actor, object_type="project", object_id=project_id,
           details={"start": start.isoformat(), "end": end.isoformat(), "people": people, "format": fmt},
           context=context, now=now)
