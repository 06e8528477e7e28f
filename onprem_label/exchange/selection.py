"""What an export holds: a project's tasks by state, date and label, never gold, tests or unchecked pixels."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from types import SimpleNamespace
from typing import Any, Iterator, Mapping

from sqlalchemy import and_, func, or_, select

from onprem_label.db.models import TASK_STATES, Annotation, Item, ItemImage, Task
from onprem_label.imaging.renditions import image_index

A, IMAGES, ITEMS, T = Annotation.__table__, ItemImage.__table__, Item.__table__, Task.__table__

PAGE = 500


class FilterError(ValueError):
    """A malformed export filter; `field` names the parameter."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class ExportFilter:
    """Which tasks: states (accepted by default), accepted/updated in [since, until), shapes of some labels."""

    states: tuple[str, ...] = ("accepted",)
    since: datetime | None = None
    until: datetime | None = None
    labels: tuple[str, ...] = ()  # empty: every label

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe, for the audit event."""
        return {"states": list(self.states), "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None, "labels": list(self.labels)}


def _day(name: str, value: str) -> datetime:
    try:
        return datetime.combine(date.fromisoformat(value), time(), tzinfo=timezone.utc)
    except ValueError:
        raise FilterError(name, f"{name} is a date (YYYY-MM-DD)") from None


def parse_filter(args: Mapping[str, Any]) -> ExportFilter:
    """An ExportFilter from query or CLI values: state (comma-separated), since, until (dates, until
    inclusive), label (comma-separated); FilterError naming the bad one."""
    states = tuple(s for s in str(args.get("state") or "accepted").split(",") if s)
    bad = [s for s in states if s not in TASK_STATES]
    if bad or not states:
        raise FilterError("state", f"state is one or more of {', '.join(TASK_STATES)}")
    since = _day("since", args["since"]) if args.get("since") else None
    try:
        until = _day("until", args["until"]) + timedelta(days=1) if args.get("until") else None
    except OverflowError:
        raise FilterError("until", "until is a date before the year 9999") from None
    if since and until and until <= since:
        raise FilterError("until", "until is on or after since")
    labels = tuple(s for s in str(args.get("label") or "").split(",") if s)
    if any(len(s) > 64 for s in labels) or len(labels) > 100:
        raise FilterError("label", "up to 100 label names")
    return ExportFilter(states, since, until, labels)


@dataclass
class ExportRow:
    """One task to export: its item (de-identified facts), the item's images, the final labels."""

    task: Any
    item: Any
    images: list = field(default_factory=list)
    annotation: Any = None

    @property
    def shapes(self) -> list[dict]:
        """The final revision's shapes (none without a revision)."""
        return list(self.annotation.shapes) if self.annotation is not None else []

    @property
    def classifications(self) -> dict:
        """The final revision's answers."""
        return dict(self.annotation.classifications) if self.annotation is not None else {}


def _released():
    """Items that may leave: no burned-in text suspected, or a manager has looked."""
    return or_(ITEMS.c.needs_pixel_check.is_(False), ITEMS.c.pixel_check_cleared_at.is_not(None))


def _conditions(project_id: int, flt: ExportFilter) -> list:
    when = func.coalesce(T.c.accepted_at, T.c.updated_at)
    out = [T.c.project_id == project_id, T.c.purpose == "work", T.c.state.in_(flt.states)]
    if flt.since:
        out.append(when >= flt.since)
    if flt.until:
        out.append(when < flt.until)
    return out


def count(conn, project_id: int, flt: ExportFilter) -> dict[str, int]:
    """How many tasks the filter takes, and how many it must leave out for an unchecked pixel flag."""
    base = select(func.count()).select_from(T).join(ITEMS, ITEMS.c.id == T.c.item_id).where(
        *_conditions(project_id, flt))
    return {"tasks": conn.execute(base.where(_released())).scalar_one(),
            "withheld_pixel_check": conn.execute(base.where(~_released())).scalar_one()}


def frames(conn, project_id: int, flt: ExportFilter) -> dict[int, int]:
    """Frames the filter takes, by item kind ({"dicom": n, "raster": m}): what an export with images reads."""
    return {kind: int(n or 0) for kind, n in conn.execute(
        select(ITEMS.c.kind, func.sum(ITEMS.c.frames)).select_from(T).join(ITEMS, ITEMS.c.id == T.c.item_id)
        .where(*_conditions(project_id, flt), _released()).group_by(ITEMS.c.kind))}


def rows(conn, project_id: int, flt: ExportFilter, *, page: int = PAGE, shapes: bool = True) -> Iterator[ExportRow]:
    """The tasks the filter takes, by task id, a page at a time (memory stays flat), each with its item,
    images and final labels; shapes of other labels dropped when the filter names labels, and every
    shape left unread with `shapes=False` (a pass that writes only images and answers)."""
    revision_columns = [c for c in A.c if shapes or c.name != "shapes"]
    after = 0
    while True:
        tasks = conn.execute(select(T, ITEMS.c.width, ITEMS.c.height, ITEMS.c.frames, ITEMS.c.modality,
                                    ITEMS.c.kind, ITEMS.c.study_uid, ITEMS.c.series_uid)
                             .join(ITEMS, ITEMS.c.id == T.c.item_id)
                             .where(*_conditions(project_id, flt), _released(), T.c.id > after)
                             .order_by(T.c.id).limit(page)).all()
        if not tasks:
            return
        ids = [t.id for t in tasks]
        # The final revision of this page's tasks only (a project-wide GROUP BY per page grows with the table).
        last = (select(A.c.task_id, func.max(A.c.revision).label("revision")).where(A.c.task_id.in_(ids))
                .group_by(A.c.task_id).subquery())
        finals = {a.task_id: a for a in conn.execute(
            select(*revision_columns).join(last, and_(last.c.task_id == A.c.task_id,
                                                      last.c.revision == A.c.revision)))}
        images: dict[int, list] = {}
        for image in conn.execute(select(IMAGES.c.item_id, IMAGES.c.position, IMAGES.c.instance_uid, IMAGES.c.frames,
                                         IMAGES.c.blob_id, IMAGES.c.meta, IMAGES.c.source_digest, IMAGES.c.source_page)
                                  .where(IMAGES.c.item_id.in_([t.item_id for t in tasks]))
                                  .order_by(IMAGES.c.item_id, IMAGES.c.position)):
            images.setdefault(image.item_id, []).append(image)
        for t in tasks:
            item = SimpleNamespace(id=t.item_id, width=t.width, height=t.height, frames=t.frames,
                                   modality=t.modality, kind=t.kind, study_uid=t.study_uid, series_uid=t.series_uid)
            row = ExportRow(task=t, item=item, images=images.get(t.item_id, []), annotation=finals.get(t.id))
            if not shapes and row.annotation is not None:
                row.annotation = _Revision(row.annotation, [])
            elif flt.labels and row.annotation is not None:
                kept = [s for s in row.annotation.shapes if s.get("label") in flt.labels]
                row.annotation = _Revision(row.annotation, kept)
            yield row
        if len(tasks) < page:
            return
        after = ids[-1]


class _Revision:
    """A revision with some shapes left out (the label filter)."""

    def __init__(self, original, shapes: list[dict]):
        self._original, self.shapes = original, shapes

    def __getattr__(self, name: str):
        return getattr(self._original, name)


def frame_name(item_id: int, frame: int, slot: int = 0) -> str:
    """The file stem one frame of an item has in every export (and in an images folder beside it);
    consensus copies after the first carry their copy number, so no two labelers' files collide."""
    return f"item-{item_id}-frame-{frame:04d}" if not slot else f"item-{item_id}-copy-{slot}-frame-{frame:04d}"


def instance_of(row: ExportRow, frame: int) -> str | None:
    """The de-identified SOP Instance UID holding one frame of the item (None for pictures)."""
    try:
        return row.images[image_index(row.images, frame)[0]].instance_uid
    except ValueError:
        return None
