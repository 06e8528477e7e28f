"""Models of quality and people: gold and its checks, qualification tests, work time, skills, pay, role proposals."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, CheckConstraint, Float, ForeignKey, Index, Integer, String, Text, text, true
from sqlalchemy.orm import Mapped, mapped_column

from onprem_label.db.base import Base, UTCDateTime
from onprem_label.db.models import JSONType

TASK_PURPOSES = ("work", "held", "gold", "qualification", "spot_check")


class GoldItem(Base):
    """An item with a manager's reference answer, used for hidden checks and qualification tests."""

    __tablename__ = "gold_items"
    __table_args__ = (CheckConstraint("use IN ('hidden', 'qualification', 'both')", name="use"),)

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="RESTRICT"), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="RESTRICT"), index=True)
    use: Mapped[str] = mapped_column(String(16), default="both")
    # {"shapes": [...], "classifications": {...}}, validated against the schema when marked.
    reference: Mapped[dict[str, Any]] = mapped_column(JSONType)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class GoldCheck(Base):
    """One answer on a gold item scored against its reference (workflow.metrics).

    `stage` is "submitted" for the labeler's hand-in of a round and "accepted" for the labels that
    full inspection let through: the second is what estimates the accuracy of accepted work.
    """

    __tablename__ = "gold_checks"
    __table_args__ = (
        CheckConstraint("purpose IN ('gold', 'qualification')", name="purpose"),
        CheckConstraint("stage IN ('submitted', 'accepted')", name="stage"),
        Index("ix_gold_checks_project_user", "project_id", "user_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="RESTRICT"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="RESTRICT"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    purpose: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str] = mapped_column(String(16))
    round: Mapped[int] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    correct: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class QualificationAttempt(Base):
    """One sitting of a project's qualification test: its gold items, and the result once all are done."""

    __tablename__ = "qualification_attempts"
    __table_args__ = (
        Index("ix_qualification_attempts_project_user", "project_id", "user_id"),
        # One test under way per person and project, even with two requests at once.
        Index("uq_qualification_attempts_open", "project_id", "user_id", unique=True,
              sqlite_where=text("passed IS NULL"), postgresql_where=text("passed IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="RESTRICT"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    item_ids: Mapped[list[int]] = mapped_column(JSONType)
    pass_mark: Mapped[float] = mapped_column(Float)
    answered: Mapped[int] = mapped_column(Integer, default=0)
    correct: Mapped[int] = mapped_column(Integer, default=0)
    score: Mapped[float | None] = mapped_column(Float)
    passed: Mapped[bool | None] = mapped_column(Boolean)  # None while the test is under way
    # False once a manager has granted a fresh start: it no longer uses up a retake or a cool-down.
    counted: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WorkLog(Base):
    """One lease's worth of active time by one person on one task: what statements and speed are made of."""

    __tablename__ = "work_log"
    __table_args__ = (
        CheckConstraint("kind IN ('label', 'review')", name="kind"),
        Index("ix_work_log_project_user_ended", "project_id", "user_id", "ended_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="RESTRICT"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))  # submit | accept | reject | correct | release
    seconds: Mapped[int] = mapped_column(Integer)
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PayEntry(Base):
    """One line of the pay ledger, written when a task is accepted; append-only (migration 0006 triggers).

    `amount` is a decimal string (exact on both databases) in `currency`, already rounded as the
    project's pay settings state.
    """

    __tablename__ = "pay_entries"
    __table_args__ = (
        CheckConstraint("kind IN ('label', 'review', 'gold')", name="kind"),
        Index("ix_pay_entries_project_user_created", "project_id", "user_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="RESTRICT"))
    user_id: Mapped[int] = mapped_column(Integer)  # no foreign key: the ledger outlives accounts
    task_id: Mapped[int] = mapped_column(Integer, index=True)
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[str] = mapped_column(String(32))
    currency: Mapped[str] = mapped_column(String(3))
    rate: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RoleProposal(Base):
    """A proposal to make a labeler a reviewer of a project (or to take the role back), and its fate."""

    __tablename__ = "role_proposals"
    __table_args__ = (
        CheckConstraint("kind IN ('promote', 'demote')", name="kind"),
        CheckConstraint("status IN ('open', 'confirmed', 'dismissed')", name="status"),
        Index("ix_role_proposals_project_status", "project_id", "status"),
        # One open proposal of a kind per person and project, however many evaluations race.
        Index("uq_role_proposals_open", "project_id", "user_id", "kind", unique=True,
              sqlite_where=text("status = 'open'"), postgresql_where=text("status = 'open'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="RESTRICT"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="open")
    figures: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    decided_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SkillProfile(Base):
    """Counters of one person's history in one skill (a modality or a label class), across projects.

    Kept up to date as work is reviewed and gold is scored (workflow.matching), so matching reads a
    handful of rows and never the person's whole history.
    """

    __tablename__ = "skill_profiles"
    __table_args__ = (CheckConstraint("kind IN ('modality', 'class')", name="kind"),)

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    skill: Mapped[str] = mapped_column(String(64), primary_key=True)
    reviewed: Mapped[int] = mapped_column(Integer, default=0)  # first-round human reviews of their labels
    passed: Mapped[int] = mapped_column(Integer, default=0)  # of those, accepted as they were
    gold: Mapped[int] = mapped_column(Integer, default=0)  # first answers on hidden gold
    gold_correct: Mapped[int] = mapped_column(Integer, default=0)
    label_seconds: Mapped[int] = mapped_column(Integer, default=0)
    label_tasks: Mapped[int] = mapped_column(Integer, default=0)  # hand-ins the seconds were spent on
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
