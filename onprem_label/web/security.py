"""Request hardening: CSRF tokens, security headers on every response, request ids."""

from __future__ import annotations

import hmac
import secrets

from flask import Flask, Response, abort, g, request, session
from flask.json.provider import DefaultJSONProvider

from onprem_label.audit import AuditAction, record
from onprem_label.web.context import audit_context, db, is_api_request, now, request_id, services
from onprem_label.web.uploads import is_streamed_upload

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
    if is_api_request() and request.headers.get("Authorization", "").startswith("Bearer "):
        # A bad or revoked token: the login check answers 401. Browsers never attach this
        # header on their own, so it carries no ambient authority to forge.
        return
    expected = session.get("csrf")
    # A streamed upload's body is decoded by its handler (web/uploads.py): header only here.
    form_token = "" if is_streamed_upload() else request.form.get(CSRF_FIELD, "")
    sent = request.headers.get(CSRF_HEADER) or form_token
    if expected and sent and hmac.compare_digest(str(sent).encode(), expected.encode()):
        return
    user = getattr(session, "user", None)
    dbs = db()
    record(dbs, AuditAction.CSRF_REJECTED, actor=user, outcome="denied",
           details={"path": request.path[:200], "method": request.method},
           context=audit_context(), now=now())
    dbs.commit()
    abort(403, description="The form has expired or did not come from this site. "
                           "Reload the page and try again.")


class GuardedJSONProvider(DefaultJSONProvider):
    """Flask's JSON, except that nesting too deep to parse is a malformed body, not a 500."""

    def loads(self, s, **kwargs):
        """Parse JSON; RecursionError becomes the ValueError that request.get_json handles."""
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def _unstorable(text: str) -> bool:
    """NUL, or a lone surrogate (from JSON "\\ud800") that no database encoding can hold."""
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _has_nul(value) -> bool:
    stack = [value]  # a loop, not recursion: any depth the parser accepted is walked safely
    while stack:
        item = stack.pop()
        if isinstance(item, str) and _unstorable(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def reject_nul_bytes() -> None:
    """before_request: a NUL character in the path, query, form or JSON is a 400.

    PostgreSQL cannot store NUL in text, so such input would otherwise end in a 500 wherever
    it reached the database (a lookup, an audit row).
    """
    reads_form = request.method not in SAFE_METHODS and not is_streamed_upload()
    sources = [request.args] + ([request.form] if reads_form else [])
    fields = [request.path] + [item for source in sources for key, values in source.lists()
                               for item in (key, *values)]
    if reads_form and request.is_json:  # streamed bodies (uploads, imports) are checked by their readers
        fields.append(request.get_json(silent=True))
    if any(_has_nul(field) for field in fields):
        abort(400, description="The request contains a NUL character or invalid Unicode, "
                               "which no field may hold.")


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
    """Register the hooks, the guarded JSON parser and the csrf_token template global."""
    app.json = GuardedJSONProvider(app)
    app.after_request(add_security_headers)
    app.jinja_env.globals["csrf_token"] = csrf_token
