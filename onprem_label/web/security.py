"""Request hardening: CSRF tokens, security headers on every response, request ids."""

from __future__ import annotations

import hmac
import secrets

from flask import Flask, Response, abort, g, request, session

from onprem_label.audit import AuditAction, record
from onprem_label.web.context import audit_context, db, now, request_id, services

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

CSP = ("default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")


def csrf_token() -> str:
    """This session's CSRF token (made on first use); templates put it in every form."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    """before_request: refuse a state-changing request without the session's token.

    Requests authenticated by a bearer token carry no ambient cookie authority and are exempt.
    """
    if request.method in SAFE_METHODS or g.get("auth_via_token"):
        return
    expected = session.get("csrf")
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    if expected and sent and hmac.compare_digest(str(sent), expected):
        return
    user = getattr(session, "user", None)
    dbs = db()
    record(dbs, AuditAction.CSRF_REJECTED, actor=user, outcome="denied",
           details={"path": request.path[:200], "method": request.method},
           context=audit_context(), now=now())
    dbs.commit()
    abort(403, description="The form has expired or did not come from this site. "
                           "Reload the page and try again.")


def add_security_headers(response: Response) -> Response:
    """after_request: headers every response carries, error pages included."""
    headers = response.headers
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["X-Frame-Options"] = "DENY"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Cross-Origin-Resource-Policy"] = "same-origin"
    headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=(), interest-cohort=()"
    headers["X-Request-Id"] = request_id()
    if not request.path.startswith("/static/"):
        # Pages show patient images and user data: never keep them in a shared cache.
        headers["Cache-Control"] = "no-store"
        headers["Pragma"] = "no-cache"
    if services().settings.https:
        headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
    return response


def init_app(app: Flask) -> None:
    """Register the hooks and the csrf_token template global."""
    app.after_request(add_security_headers)
    app.jinja_env.globals["csrf_token"] = csrf_token
