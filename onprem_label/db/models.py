"""Models: users, sessions, tokens, projects, members, blobs, audit events, items and their images."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, Float, ForeignKey, Index, Integer,
                        LargeBinary, String, Text, UniqueConstraint, text)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from onprem_label.config import ROLES
from onprem_label.db.base import Base, UTCDateTime

JSONType = JSON().with_variant(JSONB(), "postgresql")
PROJECT_ROLES = ("labeler", "reviewer", "manager")


class User(Base):
    """A local account. Roles are a space-separated set drawn from config.ROLES."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Stored lowercased so 'Alice' and 'alice' cannot be two accounts.
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str] = mapped_column(String(255))
    roles: Mapped[str] = mapped_column(String(200), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    last_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # TOTP secret sealed with a key derived from the master key; never stored in clear.
    totp_secret_sealed: Mapped[str | None] = mapped_column(Text)
    totp_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    totp_last_step: Mapped[int | None] = mapped_column(Integer)
    recovery_codes: Mapped[list[str]] = mapped_column(JSONType, default=list)
    # One-time emergency code set at the console; hashed; cleared on use.
    break_glass_hash: Mapped[str | None] = mapped_column(String(255))
    break_glass_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    password_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def role_set(self) -> frozenset[str]:
        """The user's roles as a set."""
        return frozenset(self.roles.split())

    # The user protocol flask-login expects, written out so the model needs no Flask import.
    is_authenticated = True
    is_anonymous = False

    @property
    def is_active(self) -> bool:
        """flask-login's name for `active`."""
        return self.active

    def get_id(self) -> str:
        """flask-login's user id."""
        return str(self.id)

    def __repr__(self) -> str:
        return f"<User {self.id} {self.username}>"


class LoginSession(Base):
    """A server-side browser session: the cookie carries a random id, the table its hash."""

    __tablename__ = "login_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sid_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    client_addr: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(300), default="")
    break_glass: Mapped[bool] = mapped_column(Boolean, default=False)
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)

    user: Mapped[User] = relationship()


class ApiToken(Base):
    """A bearer token for scripts: only its SHA-256 is kept, so the table cannot be replayed."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship()


class Project(Base):
    """A labeling project; its schema and workflow settings are JSON validated by the workflow."""

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    label_schema: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    schema_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    settings: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    members: Mapped[list[ProjectMember]] = relationship(back_populates="project",
                                                        cascade="all, delete-orphan")


class ProjectMember(Base):
    """A user's role in one project; one row per (project, user, role)."""

    __tablename__ = "project_members"
    __table_args__ = (
        CheckConstraint("role IN ('labeler', 'reviewer', 'manager')", name="role"),
    )

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"),
                                            primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(20), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime)

    project: Mapped[Project] = relationship(back_populates="members")
    user: Mapped[User] = relationship()


class Blob(Base):
    """A stored encrypted blob, named by the keyed hash of its content (see storage/)."""

    __tablename__ = "blobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """One security or data event, a link of the hash chain (audit.chain); append-only.

    Triggers (migration 0005) refuse UPDATE and DELETE on both databases; `audit archive` is the
    one sanctioned way to move old events out. `id` is the chain's sequence number, assigned by
    audit.chain (never by the database), so the ids have no gaps.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        CheckConstraint("outcome IN ('success', 'denied', 'failure')", name="outcome"),
        Index("ix_audit_events_ts", "ts"),
        Index("ix_audit_events_actor_id", "actor_id"),
        Index("ix_audit_events_object", "object_type", "object_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts: Mapped[datetime] = mapped_column(UTCDateTime)
    # No foreign key: the trail must outlive the accounts it names.
    actor_id: Mapped[int | None] = mapped_column(Integer)
    actor_name: Mapped[str] = mapped_column(String(64), default="")
    actor_role: Mapped[str] = mapped_column(String(200), default="")
    action: Mapped[str] = mapped_column(String(64), index=True)
    object_type: Mapped[str] = mapped_column(String(32), default="")
    object_id: Mapped[str] = mapped_column(String(64), default="")
    outcome: Mapped[str] = mapped_column(String(10))
    client_addr: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(300), default="")
    request_id: Mapped[str] = mapped_column(String(64), default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    study_uid: Mapped[str] = mapped_column(String(64), default="", server_default="")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditAnchor(Base):
    """Where the chain goes on after `audit archive` moved its prefix into a sealed file."""

    __tablename__ = "audit_anchors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    archived_at: Mapped[datetime] = mapped_column(UTCDateTime)
    first_id: Mapped[int] = mapped_column(Integer)
    last_id: Mapped[int] = mapped_column(Integer, unique=True)
    last_hash: Mapped[str] = mapped_column(String(64))
    file_name: Mapped[str] = mapped_column(String(255))
    file_sha256: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))


__all__ = ["ApiToken", "AuditAnchor", "AuditEvent", "Blob", "LoginSession", "PROJECT_ROLES", "Project", "ProjectMember",
           "ROLES", "User"]


ITEM_KINDS = ("dicom", "raster")


class Item(Base):
    """One unit of labeling work: a picture, a DICOM instance (one or more frames) or a series stack.

    Its frames are the frames of its images in `position` order. Every value here is
    de-identified; the original identifiers never reach the database (see DeidLink).
    """

    __tablename__ = "items"
    __table_args__ = (
        CheckConstraint("kind IN ('dicom', 'raster')", name="kind"),
        Index("ix_items_project_id_series_uid", "project_id", "series_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="RESTRICT"), index=True)
    kind: Mapped[str] = mapped_column(String(10))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer)
    modality: Mapped[str] = mapped_column(String(16), default="")
    study_uid: Mapped[str | None] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64))
    is_stack: Mapped[bool] = mapped_column(Boolean, default=False)
    # Burned-in text suspected: kept out of exports until a manager has looked at the pixels.
    needs_pixel_check: Mapped[bool] = mapped_column(Boolean, default=False)
    pixel_check_reasons: Mapped[list[str]] = mapped_column(JSONType, default=list)
    pixel_check_cleared_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    pixel_check_cleared_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    source: Mapped[str] = mapped_column(String(16))  # upload | cli | dicom
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    images: Mapped[list[ItemImage]] = relationship(back_populates="item", order_by="ItemImage.position",
                                                   cascade="all, delete-orphan")


class ItemImage(Base):
    """One stored file of an item: a de-identified DICOM instance or one page of a picture.

    `source_digest` is a keyed hash of the file as it arrived (never the file), so the same
    file ingested twice into a project is reported as a duplicate.
    """

    __tablename__ = "item_images"
    __table_args__ = (
        UniqueConstraint("project_id", "source_digest", "source_page", name="uq_item_images_source"),
        UniqueConstraint("project_id", "instance_uid", name="uq_item_images_instance"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="RESTRICT"))
    position: Mapped[int] = mapped_column(Integer)  # renumbered when a stack gains an instance
    blob_id: Mapped[str] = mapped_column(ForeignKey("blobs.id", ondelete="RESTRICT"), index=True)
    source_digest: Mapped[str] = mapped_column(String(64))
    source_page: Mapped[int] = mapped_column(Integer, default=0)
    instance_uid: Mapped[str | None] = mapped_column(String(64))
    sort_key: Mapped[float] = mapped_column(Float, default=0.0)  # order within a series stack
    frames: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    # De-identified facts needed to show it (modality, photometric, windows) and the report of
    # what de-identification did (keywords and counts, never values).
    meta: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    deid_report: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    item: Mapped[Item] = relationship(back_populates="images")


class Rendition(Base):
    """A cached rendering (a frame's PNG at one window, or a thumbnail) of a stored image blob."""

    __tablename__ = "renditions"

    source_blob_id: Mapped[str] = mapped_column(ForeignKey("blobs.id", ondelete="CASCADE"),
                                                primary_key=True)
    frame: Mapped[int] = mapped_column(Integer, primary_key=True)
    spec: Mapped[str] = mapped_column(String(64), primary_key=True)  # e.g. "default", "w400c40", "thumb256"
    blob_id: Mapped[str] = mapped_column(ForeignKey("blobs.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DeidLink(Base):
    """Original identifiers of one image, sealed with a key derived from the master key.

    Written only when the admin has switched `deid_linkage` on.
    """

    __tablename__ = "deid_links"

    image_id: Mapped[int] = mapped_column(ForeignKey("item_images.id", ondelete="CASCADE"),
                                          primary_key=True)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


TASK_STATES = ("new", "labeling", "submitted", "reviewing", "rework", "escalated", "accepted")


class SchemaVersion(Base):
    """One saved version of a project's label schema; annotations record the version they used."""

    __tablename__ = "schema_versions"

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    label_schema: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Task(Base):
    """The work on one item: its state in the full-inspection loop, its people and its lease.

    `version` rises with every change (save or transition): a request based on an older version
    is stale (409). The lease is a (owner, expiry) pair; an expired lease is as good as none.
    """

    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint("state IN ('new', 'labeling', 'submitted', 'reviewing', 'rework', 'escalated', "
                        "'accepted')", name="state"),
        # The queues: next new task by id, expired leases by expiry, a labeler's rework by age.
        Index("ix_tasks_queue", "project_id", "state", "id"),
        Index("ix_tasks_expiry", "project_id", "state", "lease_expires_at"),
        Index("ix_tasks_labeler_state", "project_id", "labeler_id", "state", "updated_at"),
        CheckConstraint("purpose IN ('work', 'held', 'gold', 'qualification', 'spot_check')", name="purpose"),
        Index("ix_tasks_item_id", "item_id"),
        # One work task per consensus slot of an item; gold and qualification tasks are one per
        # person and answer, so they stay outside the constraint.
        Index("uq_tasks_item_slot", "item_id", "slot", unique=True,
              sqlite_where=text("purpose IN ('work', 'held')"), postgresql_where=text("purpose IN ('work', 'held')")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="RESTRICT"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="RESTRICT"))
    state: Mapped[str] = mapped_column(String(16), default="new")
    # work: real labeling work; held: an item's work task held back while the item is gold;
    # gold: a hidden gold check handed to one labeler; qualification: one question of a test;
    # spot_check: an accepted task's labels reviewed again, blind, by a second reviewer.
    purpose: Mapped[str] = mapped_column(String(16), default="work", server_default="work")
    slot: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # consensus copy 0..k-1
    # Consensus: the item's agreement across its k copies, once all were submitted (low first to review).
    agreement: Mapped[float | None] = mapped_column(Float)
    # Active seconds of the current lease (the work log's line when the lease ends).
    lease_seconds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A spot check's accepted task (whose reviewer it measures).
    origin_task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    round: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, default=1)
    labeler_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    reviewer_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    lease_owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    review_sampled: Mapped[bool | None] = mapped_column(Boolean)
    active_seconds: Mapped[int] = mapped_column(Integer, default=0)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    accepted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Annotation(Base):
    """One saved revision of a task's labels; every save adds a row, none is ever changed."""

    __tablename__ = "annotations"
    __table_args__ = (
        UniqueConstraint("task_id", "revision", name="uq_annotations_task_revision"),
        CheckConstraint("kind IN ('label', 'correction', 'import')", name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[str] = mapped_column(String(16), default="label")
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    # Who made a revision no user authored: "import:<name>" for a model's predictions (kind "import").
    source: Mapped[str | None] = mapped_column(String(80))
    schema_version: Mapped[int] = mapped_column(Integer)
    shapes: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    classifications: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Review(Base):
    """A reviewer's decision on one round of a task (or the sampler's automatic acceptance)."""

    __tablename__ = "reviews"
    __table_args__ = (
        CheckConstraint("decision IN ('accept', 'reject', 'correct', 'auto_accept')", name="decision"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    reviewer_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    decision: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str] = mapped_column(Text, default="")
    shape_id: Mapped[str | None] = mapped_column(String(64))  # a reject comment pinned to one shape
    annotation_revision: Mapped[int | None] = mapped_column(Integer)
    # The label classes of the revision decided on (quality figures per class); None before 0006.
    classes: Mapped[list[str] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


# The quality and people tables live in their own module; importing it here registers them
# wherever the models are loaded.
from onprem_label.db import quality  # noqa: E402,F401
