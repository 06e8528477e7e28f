"""Who is calling: flask-login wired to server-side sessions and bearer tokens; permission checks."""

from __future__ import annotations

from functools import wraps
from urllib.parse import urlsplit

from flask import Flask, abort, g, jsonify, redirect, request, session, url_for
from flask_login import LoginManager, current_user

from onprem_label.audit import AuditAction, record
from onprem_label.auth import tokens
from onprem_label.auth.roles import Permission, has_permission
from onprem_label.db.engine import read_connection
from onprem_label.db.models import User
from onprem_label.web.context import audit_context, db, is_api_request, now, services

class RequestLoaderLoginManager(LoginManager):
    """flask-login with one way in: our request loader (session row or bearer token).

    Stock flask-login prefers a `remember_token` cookie over the request loader when one is
    present; anyone able to plant such a cookie could then log users out. We never issue it.
    """

    def _load_user(self):
        return self._update_request_context_with_user(self._request_callback(request))


login_manager = RequestLoaderLoginManager()
login_manager.session_protection = None  # our sessions are server-side and rotated at login

# Endpoints a user may reach while a password change or TOTP enrolment is pending.
GATE_EXEMPT = frozenset({"auth.change_password", "auth.logout", "auth.totp_enrol", "static",
                         "health.healthz"})


@login_manager.request_loader
def _load_user(req) -> User | None:
    header = req.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        token = header[len("Bearer "):].strip()
        use = tokens.recently_checked(token)
        if use is None:
            with read_connection(services().engine) as conn:
                use = tokens.authenticate_token(conn, token)
        g.auth_via_token = use is not None
        if use is None:
            return None
        if tokens.needs_touch(use, now=now()):  # a short write of its own, once a minute
            dbs = db()
            tokens.touch_token(dbs, use, now=now())
            dbs.commit()
        return use.user
    return getattr(session, "user", None)


@login_manager.unauthorized_handler
def _unauthorized():
    if is_api_request():
        return _json_error(401, "unauthorized", "Log in or send 'Authorization: Bearer <token>'.")
    return redirect(url_for("auth.login", next=safe_next(request.full_path)))


def _json_error(status: int, code: str, message: str):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def safe_next(target: str | None) -> str | None:
    """Only same-site relative paths are followed after login (no open redirect)."""
    if not target:
        return None
    if any(ord(c) < 0x20 or c in "\\\x7f" for c in target):
        return None  # CR/LF would break the Location header; a backslash is read as '/' by browsers
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return None
    return target.rstrip("?") or None


def load_identity() -> None:
    """before_request: resolve the caller once, so CSRF and the gate know who it is."""
    _ = current_user.is_authenticated


def enforce_gate():
    """before_request: a pending password change or TOTP enrolment comes before any work."""
    if not current_user.is_authenticated or request.endpoint in GATE_EXEMPT:
        return None
    if current_user.must_change_password:
        if is_api_request():
            return _json_error(403, "password_change_required",
                               "Change the one-time password before using the API.")
        return redirect(url_for("auth.change_password"))
    row = getattr(session, "row", None)
    required = set(services().settings.require_totp_roles) & current_user.role_set
    if required and not current_user.totp_enabled and not (row is not None and row.break_glass):
        if is_api_request():
            return _json_error(403, "totp_required", "Enrol a second factor before using the API.")
        return redirect(url_for("auth.totp_enrol"))
    return None


def require(permission: Permission | None = None):
    """Decorator: the caller must be logged in and, if given, hold `permission`."""

    def decorate(view):
        @wraps(view)
        def wrapped(*args, **kwargs):
            if not current_user.is_authenticated:
                return login_manager.unauthorized()
            if permission is not None and not has_permission(current_user.role_set, permission):
                dbs = db()
                record(dbs, AuditAction.ACCESS_DENIED, actor=current_user._get_current_object(),
                       outcome="denied", details={"path": request.path[:200],
                                                  "permission": permission.value},
                       context=audit_context(), now=now())
                dbs.commit()
                abort(403)
            return view(*args, **kwargs)

        wrapped.required_permission = permission
        return wrapped

    return decorate


def init_app(app: Flask) -> None:
    """Install flask-login and the identity hooks (before the CSRF check)."""
    login_manager.init_app(app)
    app.before_request(load_identity)
