"""Item page: a de-identified image with its facts and de-identification report."""

from __future__ import annotations

from flask import Blueprint, render_template
from flask_login import current_user

from onprem_label.audit import AuditAction, record
from onprem_label.auth.roles import Permission
from onprem_label.db.models import Item, Project
from onprem_label.web.context import audit_context, db, now
from onprem_label.web.login import require
from onprem_label.workflow.errors import NotFound
from onprem_label.workflow.members import project_roles

bp = Blueprint("items", __name__)


@bp.route("/items/<id:item_id>")
@require(Permission.READ_ITEMS)
def item(item_id: int):
    """One item (audited as a read of item metadata; the picture is read through the API)."""
    dbs = db()
    found = dbs.get(Item, item_id)
    if found is None or not project_roles(dbs, found.project_id, dbs.merge(current_user._get_current_object())):
        raise NotFound("No such item.")  # another project's item: as if it did not exist (audited)
    record(dbs, AuditAction.ITEM_VIEW, actor=dbs.merge(current_user._get_current_object()), object_type="item",
           object_id=found.id, details={"project_id": found.project_id, "page": True},
           context=audit_context(), now=now(), study_uid=found.study_uid)
    project = dbs.get(Project, found.project_id)
    page = render_template("items/item.html", item=found, project=project)
    dbs.commit()
    return page
