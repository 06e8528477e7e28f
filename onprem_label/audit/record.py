"""The single entry point that writes audit events, in the caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.chain import queue, to_millis
from onprem_label.clock import utcnow
from onprem_label.db.models import User


@dataclass(frozen=True)
class AuditContext:
    """Where a request came from; the CLI uses the default (local console)."""

    client_addr: str = "console"
    user_agent: str = ""
    request_id: str = ""


CONSOLE = AuditContext()


def record(session: Session, action: AuditAction, *, actor: User | None = None,
           actor_name: str | None = None, object_type: str = "", object_id: Any = "",
           outcome: str = "success", details: dict[str, Any] | None = None,
           context: AuditContext = CONSOLE, now: datetime | None = None, study_uid: str | None = None) -> None:
    """Add one audit event to `session`'s transaction; it is sealed onto the chain at COMMIT, or
    dropped with a rollback, together with the change it records (see audit.chain)."""
    if outcome not in ("success", "denied", "failure"):
        raise ValueError(f"unknown audit outcome {outcome!r}")
    queue(session, {
        "ts": to_millis(now or utcnow()),
        "actor_id": actor.id if actor is not None else None,
        "actor_name": (actor.username if actor is not None else actor_name or "")[:64],
        "actor_role": actor.roles if actor is not None else "",
        "action": AuditAction(action).value,
        "object_type": object_type,
        "object_id": str(object_id)[:64],
        "study_uid": (study_uid or "")[:64],
        "outcome": outcome,
        "client_addr": context.client_addr[:64],
        "user_agent": context.user_agent[:300],
        "request_id": context.request_id[:64],
        "details": details or {},
    })
