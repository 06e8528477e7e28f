"""One place that turns errors into answers: JSON under /api, a plain page elsewhere, no traces."""

from __future__ import annotations

import logging

from flask import Flask, g, jsonify, make_response, render_template
from werkzeug.exceptions import HTTPException, InternalServerError

from onprem_label.auth.errors import AuthError, UnknownUser, UserExists
from onprem_label.auth.tokens import UnknownToken
from onprem_label.workflow.errors import WorkflowError
from onprem_label.web.context import is_api_request, request_id

log = logging.getLogger("onprem_label.web")

# Domain errors -> HTTP status. Anything not listed is a 422 (the request made no sense).
STATUS_OF = {UnknownUser: 404, UnknownToken: 404, UserExists: 409}


def error_response(status: int, code: str, message: str, **extra):
    """A JSON or HTML error answer, by where the request went; the failed work is rolled back.

    `extra` joins the JSON error object (a 409's current state and version, a 422's field list).
    """
    session = g.get("db")
    if session is not None:
        session.rollback()
    if is_api_request():
        response = jsonify({"error": {"code": code, "message": message, **extra}})
        response.status_code = status
        return response
    try:
        return render_template("error.html", status=status, message=message,
                               request_id=request_id()), status
    except Exception:  # the page itself failed: still answer, plainly
        log.exception("error page failed to render")
        return f"Error {status}: {message}", status, {"Content-Type": "text/plain; charset=utf-8"}


def _http_error(exc: HTTPException):
    code = (exc.name or "error").lower().replace(" ", "_").replace("'", "")
    response = make_response(error_response(exc.code or 500, code, exc.description or exc.name))
    for name, value in exc.get_headers():  # e.g. Allow on a 405, which HTTP requires
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _auth_error(exc: AuthError):
    return error_response(STATUS_OF.get(type(exc), 422), exc.code, str(exc))


def _workflow_error(exc: WorkflowError):
    response = error_response(exc.status, exc.code, str(exc), **exc.extra)
    if exc.status == 403:
        _record_denied("role")
    elif exc.status == 404:
        # "No such object" and "not in your project" look alike to the caller (no existence leak);
        # the trail keeps both, so ids guessed across projects leave a trace.
        _record_denied("not_found_or_not_a_member")
    return response


def _record_denied(reason: str) -> None:
    """A refused authorisation check is an audit event too (after the rollback of the request's work)."""
    from flask import request
    from flask_login import current_user

    from onprem_label.audit import AuditAction, record
    from onprem_label.web.context import audit_context, db, now

    if not current_user.is_authenticated:
        return  # an anonymous caller never reaches a workflow check; the 401 is the answer
    dbs = db()
    actor = dbs.merge(current_user._get_current_object())
    record(dbs, AuditAction.ACCESS_DENIED, actor=actor, outcome="denied",
           details={"path": request.path[:200], "reason": reason}, context=audit_context(), now=now())
    dbs.commit()


def _unexpected(exc: Exception):
    # Log the trace for the operator (with the request id); the client sees neither. Its message may
    # quote the request's data, so the record shows the types and frames only (logs.py's default).
    log.exception("unhandled error, request %s", request_id())
    return error_response(500, "internal_error",
                          f"Something went wrong on the server (request {request_id()}).")


def init_app(app: Flask) -> None:
    """Register the handlers."""
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(AuthError, _auth_error)
    app.register_error_handler(WorkflowError, _workflow_error)
    app.register_error_handler(InternalServerError, _unexpected)
    app.register_error_handler(Exception, _unexpected)
