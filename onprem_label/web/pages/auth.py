"""Login, second factor, break-glass, logout, password change and TOTP enrolment pages."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from flask import Blueprint, abort, redirect, render_template, request, session, url_for
from flask_login import current_user
from sqlalchemy import delete, inspect

from onprem_label.audit import AuditAction, record
from onprem_label.auth import accounts, break_glass, passwords, sessions, totp
from onprem_label.auth.errors import AuthError, PasswordPolicyError, WrongPassword
from onprem_label.auth.roles import landing_endpoint
from onprem_label.db.models import LoginSession, User
from onprem_label.web.context import audit_context, db, now, services
from onprem_label.web.login import require, safe_next
from onprem_label.web.sessions import attach_login, detach_login

bp = Blueprint("auth", __name__)

# One message for every failure, so a visitor cannot tell which usernames exist.
LOGIN_FAILED = "Sign-in failed. Check your username and password. After repeated failures an " \
               "account is locked for a while; an administrator can unlock it."
PENDING_TTL = timedelta(minutes=5)


def _rate_limited():
    """Count a login attempt from this address; an error page when over the limit."""
    svc, address, at = services(), request.remote_addr or "", now()
    if svc.rate_limiter.hit(address, at):
        return None
    dbs = db()
    record(dbs, AuditAction.LOGIN_RATE_LIMITED, actor_name=request.form.get("username", "")[:64],
           outcome="denied", context=audit_context(), now=at)
    dbs.commit()
    retry = svc.rate_limiter.retry_after(address, at)
    page = render_template("error.html", status=429, request_id="",
                           message=f"Too many sign-in attempts from this address. "
                                   f"Try again in {retry // 60 + 1} minutes.")
    return page, 429, {"Retry-After": str(retry)}


def _finish_login(user, *, break_glass_login: bool = False):
    """Open a fresh session (new id) for `user` and go to their landing page."""
    dbs = db()
    previous = getattr(session, "row", None)
    if previous is not None:  # logging in again (maybe as someone else) ends the old session
        dbs.execute(delete(LoginSession).where(LoginSession.id == inspect(previous).identity[0]))
    sid, row = sessions.start_session(dbs, user, policy=services().session_policy,
                                      break_glass=break_glass_login, context=audit_context(),
                                      now=now())
    dbs.commit()
    target = safe_next(session.get("next"))
    attach_login(session, sid, row)
    return redirect(target or url_for(landing_endpoint(user.role_set)))


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Username and password; then the second factor if the account has one."""
    if request.method != "POST":  # HEAD too: it must never reach the POST branch
        if current_user.is_authenticated:
            return redirect(url_for(landing_endpoint(current_user.role_set)))
        session["next"] = safe_next(request.args.get("next"))
        return render_template("login.html")
    limited = _rate_limited()
    if limited:
        return limited
    dbs = db()
    user = accounts.authenticate(dbs, request.form.get("username", ""),
                                 request.form.get("password", ""),
                                 policy=services().lockout, context=audit_context(), now=now())
    dbs.commit()
    if user is None:
        return render_template("login.html", error=LOGIN_FAILED,
                               username=request.form.get("username", "")[:64])
    if user.totp_enabled:
        session["pending"] = {"uid": user.id, "at": now().timestamp()}
        return redirect(url_for("auth.login_totp"))
    return _finish_login(user)


@bp.route("/login/totp", methods=["GET", "POST"])
def login_totp():
    """Second step: a TOTP code or a recovery code."""
    pending = session.get("pending") or {}
    started = datetime.fromtimestamp(pending.get("at", 0), timezone.utc)
    if not pending or now() - started > PENDING_TTL:
        session.pop("pending", None)
        return redirect(url_for("auth.login"))
    if request.method != "POST":
        return render_template("login_totp.html")
    limited = _rate_limited()
    if limited:
        return limited
    dbs = db()
    user = dbs.get(User, pending["uid"], with_for_update=True)
    at = now()
    locked = user is None or not user.active or (user.locked_until and user.locked_until > at)
    if not locked and totp.verify(user, services().totp_key, request.form.get("code", ""), now=at):
        accounts.clear_failures(user)
        session.pop("pending", None)
        return _finish_login(user)
    if user is not None and not locked:
        accounts.register_failure(dbs, user, "wrong_totp", policy=services().lockout,
                                  context=audit_context(), now=at)
    dbs.commit()
    if locked:
        session.pop("pending", None)
        return render_template("login.html", error=LOGIN_FAILED)
    return render_template("login_totp.html", error="That code is not right, or already used.")


@bp.route("/login/break-glass", methods=["GET", "POST"])
def break_glass_login():
    """Emergency admin login with a one-time code issued at the server console."""
    if request.method != "POST":
        return render_template("break_glass.html")
    limited = _rate_limited()
    if limited:
        return limited
    dbs = db()
    user = accounts.get_user(dbs, request.form.get("username", ""))
    dbs.commit()
    password_ok = passwords.verify_password(request.form.get("password", ""),
                                            user.password_hash if user else passwords.dummy_hash())
    code_ok = break_glass.redeem_code(dbs, user, request.form.get("code", ""), now=now())
    if user is not None and password_ok and code_ok:
        return _finish_login(user, break_glass_login=True)
    dbs.rollback()  # an unused code stays unused when the password was wrong
    record(dbs, AuditAction.LOGIN_FAILED, actor=user,
           actor_name=request.form.get("username", "")[:64], outcome="failure",
           details={"reason": "break_glass_failed"}, context=audit_context(), now=now())
    dbs.commit()
    return render_template("break_glass.html", error=LOGIN_FAILED)


@bp.route("/logout", methods=["POST"])
def logout():
    """End this session everywhere: the row goes, so the cookie is dead even if copied."""
    row = getattr(session, "row", None)
    if row is not None:
        dbs = db()
        sessions.end_session(dbs, dbs.merge(row), context=audit_context(), now=now())
        dbs.commit()
    detach_login(session)
    return redirect(url_for("auth.login"))


@bp.route("/account/password", methods=["GET", "POST"])
@require()
def change_password():
    """Change one's own password (needs the current one); all sessions end, this one renews."""
    forced = current_user.must_change_password
    if request.method != "POST":
        return render_template("password.html", forced=forced)
    new, confirm = request.form.get("new_password", ""), request.form.get("confirm_password", "")
    if new != confirm:
        return render_template("password.html", forced=forced,
                               error="The two new passwords differ."), 422
    limited = _rate_limited()  # guessing the current password from a stolen session is throttled
    if limited:
        return limited
    dbs = db()
    user = dbs.merge(current_user._get_current_object())
    dbs.commit()  # end the read: two scrypt runs follow, which must not hold SQLite's lock
    try:
        accounts.change_password(dbs, user, request.form.get("current_password", ""), new,
                                 policy=services().lockout, context=audit_context(), now=now())
    except (WrongPassword, PasswordPolicyError) as exc:
        dbs.commit()  # the failed attempt's audit row
        return render_template("password.html", forced=forced, error=str(exc)), 422
    dbs.commit()
    detach_login(session)
    return _finish_login(user)


@bp.route("/account/totp", methods=["GET", "POST"])
@require()
def totp_enrol():
    """Enrol an authenticator app: start (new secret shown), check one code, show recovery codes once.

    Only POSTs change state: opening the page never replaces a secret being set up.
    """
    dbs = db()
    user = dbs.merge(current_user._get_current_object())
    if request.method != "POST":
        return render_template("totp_enrol.html", enabled=user.totp_enabled)
    if user.totp_enabled:
        abort(409, description="A second factor is already enrolled; an admin can reset it.")
    if request.form.get("action") == "start":
        secret, uri = totp.begin_enrolment(dbs, user, services().totp_key, context=audit_context(), now=now())
        dbs.commit()
        return render_template("totp_enrol.html", secret=secret, uri=uri, started=True)
    try:
        codes = totp.confirm_enrolment(dbs, user, services().totp_key, request.form.get("code", ""),
                                       context=audit_context(), now=now())
    except AuthError as exc:
        return render_template("totp_enrol.html", error=str(exc), started=True), 422
    dbs.commit()
    return render_template("totp_enrol.html", recovery_codes=codes, enabled=True)
