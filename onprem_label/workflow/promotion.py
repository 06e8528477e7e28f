"""Reviewer promotion and demotion: proposals from measured figures, confirmed by a manager or automatically."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import Project, ProjectMember, User
from onprem_label.db.quality import RoleProposal
from onprem_label.workflow import members, quality
from onprem_label.workflow.errors import Conflict, Invalid, NotFound, WorkflowError
from onprem_label.workflow.settings import ProjectSettings, project_settings
from onprem_label.workflow.taskrows import TASKS as T

CHECK_EVERY = 10  # a labeler's figures are looked at again every this many accepted tasks


def promotion_reasons(figures: dict, s: ProjectSettings) -> list[str]:
    """What keeps a labeler from being proposed as reviewer (empty: propose them)."""
    gold = figures["gold_accuracy"]
    first = figures["first_pass"]
    reasons = []
    if figures["accepted"] < s.promote_min_accepted:
        reasons.append(f"{figures['accepted']} accepted tasks, {s.promote_min_accepted} needed")
    if first["value"] is None or first["value"] < s.promote_first_pass:
        reasons.append(f"first-pass acceptance {first['value']}, {s.promote_first_pass} needed")
    if gold["count"] < s.promote_min_gold:
        reasons.append(f"{gold['count']} gold checks, {s.promote_min_gold} needed")
    elif gold["count"] and gold["value"] < s.promote_gold_accuracy:  # (no gold asked for and none measured)
        reasons.append(f"gold accuracy {gold['value']}, {s.promote_gold_accuracy} needed")
    return reasons


def demotion_reason(figures: dict, s: ProjectSettings) -> str | None:
    """Why a reviewer should be proposed for demotion, or None."""
    agreement = figures["gold_agreement"]
    if agreement["count"] >= s.demote_min_reviews and agreement["value"] < s.demote_agreement:
        return f"agreement with gold {agreement['value']} over {agreement['count']} checks, {s.demote_agreement} needed"
    return None


def evaluate(db: Session, project: Project, *, now: datetime, actor: User | None = None,
             context: AuditContext = CONSOLE, only_user: int | None = None) -> list[RoleProposal]:
    """Propose promotions and demotions the figures call for (auto-promote confirms them); the new proposals."""
    settings = project_settings(project)
    if only_user is not None:
        one = quality.labeler_figures(db, project.id, only_user)
        figures = {"labelers": [{"user_id": only_user, **one}] if one else [], "reviewers": []}
    else:
        figures = quality.project_quality(db, project.id, settings)
    roles: dict[int, set[str]] = {}
    for user_id, role in db.execute(select(ProjectMember.user_id, ProjectMember.role)
                                    .where(ProjectMember.project_id == project.id)):
        roles.setdefault(user_id, set()).add(role)
    open_ = {(p.user_id, p.kind) for p in db.scalars(select(RoleProposal).where(
        RoleProposal.project_id == project.id, RoleProposal.status == "open"))}
    inactive = set(db.scalars(select(User.id).where(User.active.is_(False))))
    made = []
    for row in figures["labelers"]:
        uid = row["user_id"]
        if (only_user not in (None, uid) or uid in inactive or "reviewer" in roles.get(uid, set())
                or (uid, "promote") in open_ or promotion_reasons(row, settings)):
            continue
        made.append(_propose(db, project, uid, "promote", row, "meets every promotion threshold", now, actor, context))
    made = [p for p in made if p is not None]
    for row in figures["reviewers"]:
        uid, reason = row["user_id"], demotion_reason(row, settings)
        if (only_user is None and reason and "reviewer" in roles.get(uid, set())
                and (uid, "demote") not in open_):
            made.append(_propose(db, project, uid, "demote", row, reason, now, actor, context))
    made = [p for p in made if p is not None]
    if settings.auto_promote:
        for proposal in made:
            if proposal.kind == "promote":
                decide(db, project, proposal.id, True, actor=None, now=now, context=context, on_behalf_of=actor)
    return made


def after_acceptance(db: Session, project: Project, labeler_id: int | None, *, now: datetime,
                     actor: User | None = None, context: AuditContext = CONSOLE) -> None:
    """Look at the labeler's figures again every CHECK_EVERY accepted tasks (cheap: one indexed count)."""
    if labeler_id is None:
        return
    settings = project_settings(project)
    accepted = db.scalar(select(func.count()).select_from(T).where(
        T.c.project_id == project.id, T.c.labeler_id == labeler_id, T.c.state == "accepted", T.c.purpose == "work"))
    if accepted >= settings.promote_min_accepted and accepted % CHECK_EVERY == 0:
        try:
            with db.begin_nested():  # a proposal must never cost the acceptance that set it off
                evaluate(db, project, now=now, actor=actor, context=context, only_user=labeler_id)
        except (IntegrityError, WorkflowError):
            pass  # another request proposed them at the same moment, or the role changed meanwhile


def _propose(db: Session, project: Project, user_id: int, kind: str, figures: dict, reason: str, now: datetime,
             actor: User | None, context: AuditContext) -> RoleProposal | None:
    proposal = RoleProposal(project_id=project.id, user_id=user_id, kind=kind, status="open", figures=figures,
                            reason=reason, created_at=now)
    try:
        with db.begin_nested():  # the open-proposal index: a racing evaluation proposed them already
            db.add(proposal)
    except IntegrityError:
        return None
    record(db, AuditAction.PEOPLE_PROPOSE, actor=actor, object_type="project", object_id=project.id,
           details={"proposal_id": proposal.id, "user_id": user_id, "kind": kind, "reason": reason},
           context=context, now=now)
    return proposal


def decide(db: Session, project: Project, proposal_id: int, confirm: bool, *, actor: User | None, now: datetime,
           context: AuditContext = CONSOLE, on_behalf_of: User | None = None) -> RoleProposal:
    """Confirm (the role changes) or dismiss an open proposal; audited. `actor` None: the project auto-promoted
    (the events then name `on_behalf_of`, whose request set it off)."""
    if actor is not None:
        members.require_role(db, project.id, actor, "manager")
    if not isinstance(confirm, bool):
        raise Invalid("confirm is true or false.", errors=[{"field": "confirm", "message": "a boolean"}])
    proposal = db.get(RoleProposal, proposal_id) if isinstance(proposal_id, int) else None
    if proposal is None or proposal.project_id != project.id:
        raise NotFound("No such proposal in this project.")
    if proposal.status != "open":
        raise Conflict(f"The proposal is {proposal.status} already.", state=proposal.status)
    person = db.get(User, proposal.user_id)
    proposal.status = "confirmed" if confirm else "dismissed"
    proposal.decided_by, proposal.decided_at = (actor.id if actor else None), now
    named = actor or on_behalf_of
    if confirm and proposal.kind == "promote":
        members.add_member(db, project, person.username, "reviewer", actor=named, context=context, now=now)
    elif confirm:
        members.remove_member(db, project, person, "reviewer", actor=named, context=context, now=now,
                              reason=proposal.reason)
    record(db, AuditAction.PEOPLE_DECIDE, actor=named, object_type="project", object_id=project.id,
           details={"proposal_id": proposal.id, "user_id": proposal.user_id, "kind": proposal.kind,
                    "status": proposal.status, "automatic": actor is None}, context=context, now=now)
    return proposal


def proposals(db: Session, project_id: int, *, status: str | None = None) -> list[RoleProposal]:
    """The project's proposals, newest first (optionally of one status)."""
    query = select(RoleProposal).where(RoleProposal.project_id == project_id)
    if status is not None:
        query = query.where(RoleProposal.status == status)
    return list(db.scalars(query.order_by(RoleProposal.id.desc())))
