"""Admin user management: create, disable, unlock, reset password, roles, end sessions, reset TOTP."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user

from onprem_label.auth import accounts, sessions, tokens, totp
from onprem_label.auth.errors import AuthError
from onprem_label.auth.roles import Permission
from onprem_label.config import ROLES
from onprem_label.db.models import User
from onprem_label.web.context import audit_context, db, now
from onprem_label.web.login import require

bp = Blueprint("admin", __name__, url_prefix="/admin")


def _target(user_id: int) -> User:
    user = db().get(User, user_id)
    if user is None:
        abort(404, description="No such user.")
    return user


def _actor() -> User:
    return db().merge(current_user._get_current_object())


@bp.route("/users", methods=["GET"])
@require(Permission.MANAGE_USERS)
def users():
    """All accounts with their state."""
    return render_template("admin/users.html", users=accounts.list_users(db()), roles=ROLES,
                           now=now())


@bp.route("/users", methods=["POST"])
@require(Permission.MANAGE_USERS)
def create_user():
    """Create an account with a one-time password shown once."""
    dbs = db()
    password = accounts.generate_password()
    try:
        user = accounts.create_user(dbs, request.form.get("username", ""), password,
                                    request.form.getlist("roles"),
                                    display_name=request.form.get("display_name", "")[:200],
                                    actor=_actor(), context=audit_context(), now=now())
    except AuthError as exc:
        dbs.rollback()
        return render_template("admin/users.html", users=accounts.list_users(dbs), roles=ROLES,
                               now=now(), error=str(exc)), 422
    dbs.commit()
    return render_template("admin/user.html", user=user, roles=ROLES, one_time_password=password,
                           sessions=[], tokens=[], now=now())


@bp.route("/users/<id:user_id>", methods=["GET"])
@require(Permission.MANAGE_USERS)
def user_detail(user_id: int):
    """One account: roles, state, live sessions and tokens."""
    user = _target(user_id)
    return render_template("admin/user.html", user=user, roles=ROLES, now=now(),
                           sessions=sessions.list_user_sessions(db(), user.id),
                           tokens=tokens.list_tokens(db(), user))


@bp.route("/users/<id:user_id>/<action>", methods=["POST"])
@require(Permission.MANAGE_USERS)
def user_action(user_id: int, action: str):
    """Apply one admin action to an account and come back to its page."""
    dbs, user, ctx, at = db(), _target(user_id), audit_context(), now()
    actor = _actor()
    dbs.commit()  # end the read: a reset hashes a password, which must not hold SQLite's lock
    one_time_password = None
    try:
        if action == "disable":
            accounts.set_active(dbs, user, False, actor=actor, context=ctx, now=at)
        elif action == "enable":
            accounts.set_active(dbs, user, True, actor=actor, context=ctx, now=at)
        elif action == "unlock":
            accounts.unlock(dbs, user, actor=actor, context=ctx, now=at)
        elif action == "reset-password":
            one_time_password = accounts.reset_password(dbs, user, actor=actor, context=ctx, now=at)
        elif action == "roles":
            accounts.set_roles(dbs, user, request.form.getlist("roles"), actor=actor, context=ctx,
                               now=at)
        elif action == "end-sessions":
            accounts.end_everywhere(dbs, user, actor=actor, context=ctx, now=at)
        elif action == "reset-totp":
            totp.disable(dbs, user, actor=actor, context=ctx, now=at)
        else:
            abort(404, description="No such action.")
    except AuthError as exc:
        dbs.rollback()
        flash(str(exc), "error")
        return redirect(url_for("admin.user_detail", user_id=user_id))
    dbs.commit()
    if one_time_password:
        return render_template("admin/user.html", user=user, roles=ROLES, now=at,
                               one_time_password=one_time_password,
                               sessions=[], tokens=tokens.list_tokens(dbs, user))
    flash("Done.", "ok")
    return redirect(url_for("admin.user_detail", user_id=user_id))
