"""Flask session interface: logged-in sessions live in the database, anonymous ones in a signed cookie.

The cookie of a logged-in user carries only "a." + a random 256-bit id; the row (found by the
id's hash) holds the data, so logout, disabling a user or a password change end the session at
once, and a copied cookie is worthless afterwards. Before login, the little there is to keep (the
CSRF token, a pending second-factor step) rides in a short-lived signed cookie, so anonymous
visitors cannot fill the sessions table.
"""

from __future__ import annotations

from datetime import timedelta

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import inspect, update
from werkzeug.datastructures import CallbackDict

from onprem_label.auth import sessions as core_sessions
from onprem_label.db.models import LoginSession, User
from onprem_label.web.context import audit_context, db, now, services

AUTH_PREFIX = "a."
ANON_PREFIX = "p."
ANON_MAX_AGE = timedelta(hours=1)


class ServerSession(CallbackDict, SessionMixin):
    """Session data plus the login row it belongs to (None before login)."""

    def __init__(self, initial=None, sid: str | None = None, row: LoginSession | None = None):
        def on_update(self_):
            self_.modified = True

        super().__init__(initial, on_update)
        self.sid = sid
        self.row = row
        self.modified = False
        self.ended = False
        self.sid_is_new = False  # a login just rotated the id: the cookie must be (re)sent

    @property
    def user(self) -> User | None:
        """The logged-in user, or None."""
        return self.row.user if self.row is not None else None


class ServerSessionInterface(SessionInterface):
    """Loads and saves ServerSession objects (see module docstring)."""

    def _serializer(self, app: Flask) -> URLSafeTimedSerializer:
        return URLSafeTimedSerializer(app.secret_key, salt="onprem-label anonymous session")

    def open_session(self, app: Flask, request: Request) -> ServerSession:
        cookie = request.cookies.get(self.get_cookie_name(app), "")
        if cookie.startswith(AUTH_PREFIX):
            session = db()
            row = core_sessions.load_session(session, cookie[len(AUTH_PREFIX):],
                                             policy=services().session_policy,
                                             context=audit_context(), now=now())
            data = dict(row.data) if row is not None else {}
            # Commit now: the touch or the timeout's audit row must not wait on the handler,
            # and on SQLite an open transaction would hold the write lock.
            session.commit()
            if row is not None:
                return ServerSession(data, sid=cookie[len(AUTH_PREFIX):], row=row)
            fresh = ServerSession()
            fresh.modified = True  # replace the dead cookie
            return fresh
        if cookie.startswith(ANON_PREFIX):
            try:
                data = self._serializer(app).loads(cookie[len(ANON_PREFIX):],
                                                   max_age=int(ANON_MAX_AGE.total_seconds()))
                if isinstance(data, dict):
                    return ServerSession(data)
            except BadSignature:
                pass
        return ServerSession()

    def save_session(self, app: Flask, session: ServerSession, response: Response) -> None:
        name, domain = self.get_cookie_name(app), self.get_cookie_domain(app)
        path = self.get_cookie_path(app)
        secure, samesite = self.get_cookie_secure(app), self.get_cookie_samesite(app)
        if session.row is not None and not session.ended:
            if session.modified:
                # Whatever the handler left uncommitted (say, after an error) must not be
                # committed along with the session data, so it is rolled back first. The same
                # session is reused: a second connection would wait forever on SQLite for the
                # write lock this request's open transaction holds (BEGIN IMMEDIATE).
                row_id = inspect(session.row).identity[0]  # known even if the row is expired
                dbs = db()
                dbs.rollback()
                dbs.execute(update(LoginSession).where(LoginSession.id == row_id)
                            .values(data=dict(session)))
                dbs.commit()
            if session.modified or session.sid_is_new:
                response.set_cookie(name, AUTH_PREFIX + session.sid, httponly=True, secure=secure,
                                    samesite=samesite, path=path, domain=domain)
            return
        if not session.modified:
            return
        if not session:
            response.delete_cookie(name, domain=domain, path=path, secure=secure,
                                   samesite=samesite, httponly=True)
            return
        value = ANON_PREFIX + self._serializer(app).dumps(dict(session))
        response.set_cookie(name, value, httponly=True, secure=secure, samesite=samesite,
                            path=path, domain=domain,
                            max_age=int(ANON_MAX_AGE.total_seconds()))


def attach_login(session: ServerSession, sid: str, row: LoginSession) -> None:
    """After login: bind the new session row (a new id: rotated) to this request's session."""
    session.clear()
    session.sid, session.row, session.ended = sid, row, False
    session.sid_is_new = True
    session.modified = True


def detach_login(session: ServerSession) -> None:
    """After logout or a password change: forget the row; the cookie is cleared."""
    session.row, session.sid, session.ended = None, None, True
    session.clear()
    session.modified = True
