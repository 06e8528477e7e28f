"""The web side of the application log: request context on every record, one access line per request.

What an access line holds is chosen so that it can never carry patient data or a secret: the URL
rule (`/api/v1/items/<id:item_id>`), never the path with its query string; the user's id, not their
name; no header, form field, body or file name.
"""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, g, request, session

from onprem_label.logs import current_context, log_context, pop_context, push_context
from onprem_label.web.context import request_id

log = logging.getLogger("onprem_label.access")
errors_log = logging.getLogger("onprem_label.web")


def _user_id() -> int | None:
    # Read what flask-login already loaded: looking the caller up here would run the request loader
    # (a database read) for requests refused before load_identity, such as a 413. A login during
    # this request attached its user to the session only.
    user = g.get("_login_user")
    if user is not None and getattr(user, "is_authenticated", False):
        return user.id
    row = getattr(session, "row", None)  # a column of the row already loaded: no query
    return row.user_id if row is not None else None


def _route() -> str | None:
    return request.url_rule.rule if request.url_rule is not None else None


def begin_request() -> None:
    """before_request (first of all): start the clock; the request's fields join every record."""
    g.log_started = time.perf_counter()
    g.log_token = push_context(request_id=request_id(), method=request.method, route=_route())


def note_user() -> None:
    """before_request (after load_identity): the caller's user id joins the request's records."""
    push_context(user_id=_user_id())  # begin_request's token, reset at teardown, undoes this too


def _access_fields(response: Response) -> dict:
    fields = {**current_context(), "user_id": _user_id(), "status": response.status_code}
    if g.get("auth_via_token"):
        fields["auth"] = "token"
    elif fields["user_id"] is not None:
        fields["auth"] = "session"
    return fields


def _write(fields: dict, started: float, *, streamed: bool = False) -> None:
    # The request's fields are pushed again: a streamed body ends after teardown has reset them.
    context = {k: v for k, v in fields.items() if k not in ("status", "auth")}
    extra = {k: fields[k] for k in ("status", "auth") if k in fields}
    extra["duration_ms"] = duration = round((time.perf_counter() - started) * 1000, 1)
    if streamed:
        extra["streamed"] = True
    with log_context(**context):
        log.info("%s %s %s %.1f ms", fields.get("method"), fields.get("route") or "(no route)",
                 fields["status"], duration, extra=extra)


def log_access(response: Response) -> Response:
    """after_request: the access line; for a streamed body, when the server has sent its end."""
    started = g.get("log_started")
    if started is None:
        return response
    fields = _access_fields(response)
    if response.is_streamed:
        # An export streams for minutes after this hook: the line waits for the end of the body.
        response.response = _ReportedBody(response.response, fields)
        response.call_on_close(lambda: _write(fields, started, streamed=True))
    else:
        _write(fields, started)
    return response


class _ReportedBody:
    """A streamed body whose failure is logged with its request's fields (id, route, user).

    The error comes after Flask's handlers are done: waitress would log it, with neither the
    request id nor (logs.py drops it) the path, so the operator would not know which request.
    """

    def __init__(self, body, fields: dict):
        self._body = body
        self._context = {k: v for k, v in fields.items() if k not in ("status", "auth")}

    def __iter__(self):
        try:
            yield from self._body
        except Exception:
            with log_context(**self._context):
                errors_log.error("the streamed body of request %s failed", self._context.get("request_id"),
                                 exc_info=True)
            raise

    def close(self) -> None:
        """Close the body (the response's close calls this), started or not."""
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


def end_request(_exc: BaseException | None = None) -> None:
    """teardown_request: this worker thread's next request starts without this one's fields."""
    token = g.pop("log_token", None)
    if token is not None:
        try:
            pop_context(token)
        except ValueError:  # set in another context (cannot happen under WSGI; kept harmless)
            pass


def init_app(app: Flask) -> None:
    """Register the hooks: begin_request must run before any other before_request can refuse.

    Call it after login.init_app (note_user follows load_identity); after_request hooks run in
    reverse order, so log_access, registered before the others, sees the final status.
    """
    app.before_request_funcs.setdefault(None, []).insert(0, begin_request)
    app.before_request(note_user)
    app.after_request(log_access)
    app.teardown_request(end_request)
