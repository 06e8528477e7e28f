"""Landing pages per role."""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, url_for
from flask_login import current_user

from onprem_label.auth.roles import Permission, landing_endpoint
from onprem_label.web.context import db
from onprem_label.web.login import require
from onprem_label.web.pages.projects import render_overview  # the page and its create form
from onprem_label.workflow.mywork import my_work

bp = Blueprint("home", __name__)


@bp.route("/")
@require()
def index():
    """Send each user to the page of their role."""
    return redirect(url_for(landing_endpoint(current_user.role_set)))


@bp.route("/work")
@require()  # any account may be a member of a project; the page lists the memberships it has
def work():
    """Labelers and reviewers: their projects, what waits for them, their counts and quality."""
    return render_template("home/work.html", projects=my_work(db(), current_user._get_current_object()))


@bp.route("/projects")
@require(Permission.MANAGE_PROJECTS)
def manager():
    """Managers: every project with its counts, links to its admin page, and the create form."""
    return render_overview()


@bp.route("/welcome")
@require()
def no_role():
    """A user without roles: say so, rather than show an empty page."""
    return render_template("home/no_role.html")
