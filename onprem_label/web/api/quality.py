"""API: gold items, qualification tests, quality figures, reviewer proposals, recommended people and pay statements."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

from flask import Response, jsonify, request

from onprem_label.auth.roles import Permission
from onprem_label.db.models import User
from onprem_label.db.quality import GoldItem, RoleProposal
from onprem_label.web.api import bp
from onprem_label.web.api.workflow import _body, _user
from onprem_label.web.context import audit_context, db, now
from onprem_label.web.login import require
from onprem_label.workflow import gold, ledger, matching, members, promotion, qualification, quality
from onprem_label.workflow.errors import Invalid, NotFound
from onprem_label.workflow.settings import project_settings

MAX_PERIOD = timedelta(days=366)


def gold_json(row: GoldItem) -> dict:
    """A gold item as managers see it (never shown to labelers)."""
    return {"item_id": row.item_id, "use": row.use, "active": row.active, "reference": row.reference,
            "created_by": row.created_by, "created_at": row.created_at.isoformat(),
            "updated_at": row.updated_at.isoformat()}


def proposal_json(row: RoleProposal) -> dict:
    """A promotion or demotion proposal."""
    return {"id": row.id, "user_id": row.user_id, "kind": row.kind, "status": row.status, "reason": row.reason,
            "figures": row.figures, "created_at": row.created_at.isoformat(), "decided_by": row.decided_by,
            "decided_at": row.decided_at.isoformat() if row.decided_at else None}


# --- gold items ------------------------------------------------------------------------------------

@bp.get("/projects/<id:project_id>/gold")
@require()
def list_gold(project_id: int):
    """Managers: the project's gold items with their reference answers."""
    dbs = db()
    members.get_project(dbs, project_id, _user(), "manager")
    return jsonify({"gold": [gold_json(g) for g in gold.list_gold(dbs, project_id)]})


@bp.put("/projects/<id:project_id>/gold/<id:item_id>")
@require()
def mark_gold(project_id: int, item_id: int):
    """Managers: make an item gold, `{"reference": {"shapes": [...], "classifications": {...}}, "use"?}`."""
    body, dbs, user = _body(), db(), _user()
    project = members.get_project(dbs, project_id, user, "manager")
    row = gold.mark_gold(dbs, project, item_id, body.get("reference"), use=body.get("use", "both"), actor=user,
                         now=now(), context=audit_context())
    dbs.commit()
    return jsonify(gold_json(row))


@bp.delete("/projects/<id:project_id>/gold/<id:item_id>")
@require()
def unmark_gold(project_id: int, item_id: int):
    """Managers: the item is gold no more (its checks so far stay on record)."""
    dbs, user = db(), _user()
    project = members.get_project(dbs, project_id, user, "manager")
    gold.unmark_gold(dbs, project, item_id, actor=user, now=now(), context=audit_context())
    dbs.commit()
    return "", 204


# --- qualification --------------------------------------------------------------------------------

@bp.get("/projects/<id:project_id>/qualification")
@require()
def qualification_status(project_id: int):
    """The caller's standing in the project's qualification test."""
    dbs, user = db(), _user()
    project = members.get_project(dbs, project_id, user, "labeler")
    return jsonify(qualification.status(dbs, project.id, user.id, project_settings(project), now()))


@bp.post("/projects/<id:project_id>/qualification")
@require()
def start_qualification(project_id: int):
    """Begin the test (its questions then come from tasks/next, kind "qualification"); 201."""
    dbs, user = db(), _user()
    project = members.get_project(dbs, project_id, user, "labeler")
    qualification.start_test(dbs, project, user, now=now(), context=audit_context())
    dbs.commit()
    return jsonify(qualification.status(dbs, project.id, user.id, project_settings(project), now())), 201


@bp.post("/projects/<id:project_id>/qualification/<id:user_id>/fresh-start")
@require()
def qualification_fresh_start(project_id: int, user_id: int):
    """Managers: let a labeler who used up their retakes take the test again (failed attempts stop counting)."""
    dbs, manager = db(), _user()
    project = members.get_project(dbs, project_id, manager, "manager")
    person = dbs.get(User, user_id)
    if person is None or "labeler" not in members.project_roles(dbs, project.id, person):
        raise NotFound("No such labeler in this project.")
    standing = qualification.grant_fresh_start(dbs, project, manager, person, now=now(), context=audit_context())
    dbs.commit()
    return jsonify(standing)


# --- quality and people ---------------------------------------------------------------------------

@bp.get("/projects/<id:project_id>/quality")
@require()
def project_quality(project_id: int):
    """Managers: quality figures per labeler, reviewer, class and project, beside the accuracy target."""
    dbs = db()
    project = members.get_project(dbs, project_id, _user(), "manager")
    return jsonify(quality.project_quality(dbs, project.id, project_settings(project), project.label_schema))


@bp.get("/projects/<id:project_id>/people/proposals")
@require()
def list_proposals(project_id: int):
    """Managers: promotion and demotion proposals, newest first; `?status=open|confirmed|dismissed`."""
    dbs = db()
    members.get_project(dbs, project_id, _user(), "manager")
    status = request.args.get("status")
    if status not in (None, "open", "confirmed", "dismissed"):
        raise Invalid("Unknown status.", errors=[{"field": "status", "message": "open, confirmed or dismissed"}])
    return jsonify({"proposals": [proposal_json(p) for p in promotion.proposals(dbs, project_id, status=status)]})


@bp.post("/projects/<id:project_id>/people/evaluate")
@require()
def evaluate_people(project_id: int):
    """Managers: look at every labeler and reviewer now; the proposals this made."""
    dbs, user = db(), _user()
    project = members.get_project(dbs, project_id, user, "manager")
    made = promotion.evaluate(dbs, project, now=now(), actor=user, context=audit_context())
    dbs.commit()
    return jsonify({"proposals": [proposal_json(p) for p in made]})


@bp.post("/projects/<id:project_id>/people/proposals/<id:proposal_id>")
@require()
def decide_proposal(project_id: int, proposal_id: int):
    """Managers: `{"confirm": true|false}`; confirming changes the person's project role."""
    body, dbs, user = _body(), db(), _user()
    project = members.get_project(dbs, project_id, user, "manager")
    row = promotion.decide(dbs, project, proposal_id, body.get("confirm"), actor=user, now=now(),
                           context=audit_context())
    dbs.commit()
    return jsonify(proposal_json(row))


@bp.get("/projects/<id:project_id>/people/recommended")
@require(Permission.MANAGE_PROJECTS)
def recommended_people(project_id: int):
    """Site managers: active labelers ranked by how well their history fits the project's work (it draws
    on every project, so a manager of one project alone does not see it)."""
    dbs = db()
    project = members.get_project(dbs, project_id, _user(), "manager")
    return jsonify(matching.recommend(dbs, project))


# --- pay -----------------------------------------------------------------------------------------------

def _day(value: str) -> datetime:
    """A date as the start of that day in UTC (whole days only: a finer period could single out one
    task's payment, and so tell a person which of their tasks were gold checks)."""
    return datetime.combine(date.fromisoformat(value), time(), tzinfo=timezone.utc)


def _period() -> tuple[datetime, datetime]:
    """[from, to) from `?from=YYYY-MM-DD&to=YYYY-MM-DD` (UTC dates; `to` inclusive), default this month so far."""
    today = now().astimezone(timezone.utc).date()
    try:
        start = _day(request.args["from"]) if "from" in request.args else \
            datetime.combine(today.replace(day=1), time(), tzinfo=timezone.utc)
        end = _day(request.args["to"]) + timedelta(days=1) if "to" in request.args else \
            datetime.combine(today, time(), tzinfo=timezone.utc) + timedelta(days=1)
    except (ValueError, OverflowError):
        raise Invalid("from and to are dates (YYYY-MM-DD).", errors=[{"field": "from", "message": "a date"}]) from None
    if not timedelta(0) < end - start <= MAX_PERIOD:
        raise Invalid("The period runs forwards and spans at most 366 days.",
                      errors=[{"field": "to", "message": "after from, within 366 days"}])
    return start, end


@bp.get("/projects/<id:project_id>/pay/statements")
@require()
def pay_statements(project_id: int):
    """Per-person statements over a period (managers: everyone; others: their own); `?format=csv` for payroll."""
    dbs, user = db(), _user()
    project = members.get_project(dbs, project_id, user)
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise Invalid("format is json or csv.", errors=[{"field": "format", "message": "json or csv"}])
    start, end = _period()
    rows = ledger.statements(dbs, project.id, project_settings(project), start=start, end=end)
    if "manager" not in members.project_roles(dbs, project.id, user):
        rows = [ledger.as_seen_by_worker(r) for r in rows if r.user_id == user.id]
    ledger.record_statement_read(dbs, project.id, user, start, end, len(rows), fmt, now=now(), context=audit_context())
    dbs.commit()
    if fmt == "csv":
        name = f"pay-{project.id}-{start.date()}-{(end - timedelta(days=1)).date()}.csv"
        return Response(ledger.statements_csv(rows), mimetype="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})
    return jsonify({"currency": project_settings(project).pay_currency, "from": start.isoformat(),
                    "to": end.isoformat(), "statements": [r.__dict__ for r in rows]})

