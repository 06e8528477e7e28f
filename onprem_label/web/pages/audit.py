"""Auditor pages: search the trail (filters, pages, exports) and verify the chain."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from flask import Blueprint, render_template, request
from flask_login import current_user

from onprem_label.audit import AuditAction, record
from onprem_label.audit.chain import chain_of
from onprem_label.audit.export import public_key_hex, signing_key
from onprem_label.audit.search import OUTCOMES, FilterError, parse_filter, parse_page, search
from onprem_label.audit.text import escape_text
from onprem_label.audit.verify import verify_and_record
from onprem_label.auth.roles import Permission
from onprem_label.db.engine import read_connection
from onprem_label.web.context import audit_context, db, now, services
from onprem_label.web.login import require

bp = Blueprint("audit", __name__)
bp.add_app_template_filter(escape_text, "audit_text")  # CR/LF and controls shown as escapes
bp.add_app_template_filter(lambda value: escape_text(json.dumps(value, ensure_ascii=False, sort_keys=True)),
                           "audit_json")  # autoescape then makes it HTML-safe
FILTER_FIELDS = ("since", "until", "actor", "action", "object_type", "object_id", "outcome")


def _actor():
    return db().merge(current_user._get_current_object())


@bp.route("/audit-log")
@require(Permission.READ_AUDIT)
def log():
    """The trail, newest first, filtered by time range, user, action, object and outcome."""
    form = {name: request.args.get(name, "") for name in FILTER_FIELDS}
    try:
        flt = parse_filter(request.args)
        before, limit = parse_page(request.args)
    except FilterError as exc:
        return render_template("audit/log.html", form=form, events=[], error=exc, next_url=None,
                               export_query="", actions=_ACTIONS, outcomes=OUTCOMES), 422
    dbs = db()
    with read_connection(services().engine) as conn:  # a read: no SQLite write lock while it scans
        events, more = search(conn, flt, before=before, limit=limit)
    record(dbs, AuditAction.AUDIT_SEARCH, actor=_actor(), object_type="audit",
           details={"filters": flt.as_dict(), "before": before, "returned": len(events), "page": "web"},
           context=audit_context(), now=now())
    dbs.commit()
    kept = {k: v for k, v in form.items() if v}
    next_url = f"?{urlencode({**kept, 'before': more})}" if more else None
    return render_template("audit/log.html", form=form, events=events, error=None, next_url=next_url,
                           export_query=urlencode(kept), actions=_ACTIONS, outcomes=OUTCOMES,
                           first_page=before is None)


@bp.route("/audit-log/verify")
@require(Permission.READ_AUDIT)
def verify():
    """Walk the chain now and show the verdict, the first bad event, and what to keep off-system."""
    svc, dbs = services(), db()
    chain = chain_of(dbs)
    result = verify_and_record(dbs, svc.engine, chain, actor=_actor(), context=audit_context(), now=now())
    checkpoints = chain.checkpoints.read()[0][-5:] if chain.checkpoints is not None else []
    return render_template("audit/verify.html", result=result, checkpoints=checkpoints,
                           public_key=public_key_hex(signing_key(svc.keyring)))


_ACTIONS = sorted(a.value for a in AuditAction)
