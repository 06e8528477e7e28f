"""The application log: JSON lines or key=value records, per-request context, rotation, redaction."""

from __future__ import annotations

import contextvars
import fcntl
import json
import logging
import logging.handlers
import os
import re
import sys
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

LOG_FORMATS = ("json", "keyvalue")
COMMAND_PLACEHOLDER = "{command}"
FILE_MODE = 0o640  # the service user and its group (an operator's log reader); nobody else
# pynetdicom logs at DEBUG the original UIDs of each C-STORE, and pydicom (in debug mode) element
# values: identifiers that must not reach a log, so these stay at WARNING whatever log_level says.
ALWAYS_QUIET = ("pynetdicom", "pydicom", "highdicom")
# Chatty at DEBUG or INFO without telling an operator anything (alembic: two lines per schema check).
QUIET_UNLESS_DEBUG = ("alembic", "waitress", "PIL")
# Set on a record (extra=HIDE_EXCEPTION_TEXT) whose exception message may quote its input: a
# parser's error on a hostile DICOM may carry a patient's name; its type and frames are enough.
HIDE_EXCEPTION_TEXT = {"hide_exception_text": True}

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("onprem_label_log_context",
                                                                         default={})
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_OWN = "_onprem_label_handler"
_FORMATTED = "_onprem_label_line"
_process: dict[str, Any] = {}  # fields of every record of this process, whatever its thread
_worker: dict[str, Any] = {}  # configure_logging's choices, for worker processes
_saved_levels: dict[str, int] = {}  # logger levels as they were before configure_logging ("" = root)

# The safety net behind the rule "never log a secret": each pattern keeps its name, masks the value.
_REDACTIONS = (
    (re.compile(r"\bolt_[A-Za-z0-9_-]{8,}"), "olt_[redacted]"),  # API tokens (auth/tokens.py)
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [redacted]"),
    (re.compile(r"(?i)\b((?:__Host-)?olsession|session_id|csrf_token|cookie)(\s*[=:]\s*)[^\s;,&\"']+"),
     r"\1\2[redacted]"),
    (re.compile(r"(?i)(\"?(?:password|passwd|passphrase|secret|token|totp_code)\"?)(\s*[=:]\s*)"
                r"(\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^\s&,;\"']+)"), r"\1\2[redacted]"),
    (re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:/\s@]+:)[^@\s]+@"), r"\1[redacted]@"),  # URL passwords
)


class LogFileInUse(Exception):
    """Another process writes (and rotates) this log file; two rotating writers would lose lines."""


# One search that every pattern above needs to match first: most fields meet none, and pay one search.
_SUSPECT = re.compile(r"(?i)olt_|bearer|session|csrf|cookie|passw|passphrase|secret|token|totp|://")


def redact(text: str) -> str:
    """`text` with anything that looks like a token, a session id or a password masked."""
    if not _SUSPECT.search(text):
        return text
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def current_context() -> dict[str, Any]:
    """The fields every record of this thread or request carries now (request id, user id, ...)."""
    return dict(_context.get())


def push_context(**fields: Any) -> contextvars.Token:
    """Add fields to the context of this thread/request; returns the token pop_context takes."""
    return _context.set({**_context.get(), **fields})


def pop_context(token: contextvars.Token) -> None:
    """Restore the context as it was before the matching push_context."""
    _context.reset(token)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Fields on every record logged inside the block."""
    token = push_context(**fields)
    try:
        yield
    finally:
        pop_context(token)


def _utc_time(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _exception_text(record: logging.LogRecord) -> str | None:
    if not record.exc_info or record.exc_info[0] is None:
        return None
    kind, value, trace = record.exc_info
    if getattr(record, "hide_exception_text", False):
        frames = "".join(traceback.format_tb(trace))
        return f"Traceback (most recent call last):\n{frames}{kind.__qualname__} (message not logged)"
    return "".join(traceback.format_exception(kind, value, trace)).rstrip()


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """time, level, logger, message, then the context's and the call's own fields, then the trace."""
    fields: dict[str, Any] = {"time": _utc_time(record), "level": record.levelname.lower(),
                              "logger": record.name, "message": record.getMessage()}
    fields.update(_process)
    fields.update(_context.get())  # formatting runs in the thread that logged
    fields.update((k, v) for k, v in vars(record).items()
                  if k not in _STANDARD and k not in ("hide_exception_text", _FORMATTED))
    exception = _exception_text(record)
    if exception:
        fields["exception"] = exception
    if record.stack_info:
        fields["stack"] = record.stack_info
    return fields


# Fields whose values this code sets itself (no caller's text in them): not worth a search each.
# (The method is the client's text, so it is searched like a message.)
_OWN_FIELDS = frozenset({"time", "level", "logger", "command", "pid", "worker", "request_id", "route",
                         "user_id", "status", "duration_ms", "auth", "streamed", "association"})


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(str(value))


class _OnceFormatter(logging.Formatter):
    """Formats a record once: RotatingFileHandler formats it to measure it, then again to write it."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's line, made on the first call for this record and formatter."""
        cached = getattr(record, _FORMATTED, None)
        if cached is not None and cached[0] is self:
            return cached[1]
        line = self.format_fields(record_fields(record))
        setattr(record, _FORMATTED, (self, line))
        return line

    def format_fields(self, fields: dict[str, Any]) -> str:  # pragma: no cover - abstract
        """The line for these fields."""
        raise NotImplementedError


class JsonFormatter(_OnceFormatter):
    """One JSON object per line: what log shippers (journald exporters, Filebeat, Vector) parse."""

    def format_fields(self, fields: dict[str, Any]) -> str:
        """The fields as one line of JSON, secrets masked."""
        scrubbed = {key: value if key in _OWN_FIELDS else _scrub(value) for key, value in fields.items()}
        return json.dumps(scrubbed, ensure_ascii=False, separators=(",", ":"))


_BARE = re.compile(r"^[A-Za-z0-9_./:@+<>\[\]-]+$")


def _kv_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if _BARE.match(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


class KeyValueFormatter(_OnceFormatter):
    """One line of `key=value` pairs (logfmt): values with spaces or quotes are quoted, escaped."""

    def format_fields(self, fields: dict[str, Any]) -> str:
        """The fields as one key=value line, secrets masked."""
        return " ".join(f"{key}={_kv_value(value if key in _OWN_FIELDS else _scrub(value))}"
                        for key, value in fields.items())


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Size-rotated log file whose new files (first and after each rollover) are mode 0640."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


class PrivateWatchedFileHandler(logging.handlers.WatchedFileHandler):
    """A worker process's view of its parent's log file: reopened after the parent rotates it."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


class StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record (a test runner, or click's, may swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        """The current standard error."""
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass  # always the current sys.stderr


def log_file_path(settings, command: str) -> Path | None:
    """Where `command` writes its log: None for standard error, else the file ({command} replaced)."""
    if not settings.log_file:
        return None
    return Path(settings.log_file.replace(COMMAND_PLACEHOLDER, command)).expanduser().resolve()


def _lock_file(path: Path) -> int:
    """Hold `<file>.lock` for the life of the process; LogFileInUse when another process holds it."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LogFileInUse(f"log file {path} is written by another process; give each process its "
                           f"own file (put {COMMAND_PLACEHOLDER} in log_file, or set ONPREM_LABEL_LOG_FILE "
                           "per unit)") from None
    os.set_inheritable(fd, False)
    return fd


def make_handler(settings, command: str) -> logging.Handler:
    """The handler the settings ask for: standard error, or a rotated file; with its formatter."""
    path = log_file_path(settings, command)
    if path is None:
        handler: logging.Handler = StderrHandler()
    else:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        lock = _lock_file(path)
        handler = PrivateRotatingFileHandler(path, maxBytes=settings.log_max_mb << 20,
                                             backupCount=settings.log_backups, encoding="utf-8")
        handler.lock_fd = lock  # released with the process (or by close_logging)
    handler.setFormatter(_formatter(settings.log_format))
    setattr(handler, _OWN, True)
    return handler


def _formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else KeyValueFormatter()


def worker_config() -> dict[str, Any]:
    """What a worker process needs to log like this one (picklable; empty when not configured)."""
    return dict(_worker)


def configure_worker(config: dict[str, Any]) -> None:
    """In a worker process (imaging.isolation): records go where the parent's go, in its format.

    The worker never rotates: it appends to the parent's file and reopens it after a rotation.
    """
    if not config:
        return  # the parent logs Python's default way; so does the worker
    root = logging.getLogger()
    path = config["path"]
    handler = PrivateWatchedFileHandler(path, encoding="utf-8") if path else StderrHandler()
    handler.setFormatter(_formatter(config["format"]))
    root.addHandler(handler)
    root.setLevel(config["level"])
    for name in ALWAYS_QUIET:
        logging.getLogger(name).setLevel(max(config["level"], logging.WARNING))
    _process.update(command=config["command"], pid=os.getpid(), worker=True)


def close_logging() -> None:
    """Undo configure_logging: its handlers closed, logger levels as they were (tests; a second configure)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OWN, False)]:
        root.removeHandler(handler)
        handler.close()
        if getattr(handler, "lock_fd", None) is not None:
            os.close(handler.lock_fd)
            handler.lock_fd = None
    logging.captureWarnings(False)
    for name, level in _saved_levels.items():
        logging.getLogger(name or None).setLevel(level)
    _saved_levels.clear()
    _process.clear()
    _worker.clear()


def configure_logging(settings, command: str) -> logging.Handler:
    """Send every logger to one handler in the configured format; quiet the chatty libraries.

    `command` names the process (serve, dicom-listen) in every record and in `{command}` of log_file.
    Raises LogFileInUse, or OSError when the file cannot be opened.
    """
    close_logging()
    handler = make_handler(settings, command)
    root = logging.getLogger()
    root.addHandler(handler)
    level = getattr(logging, settings.log_level.upper())
    quiet = {name: max(level, logging.WARNING) for name in ALWAYS_QUIET}
    quiet.update((name, logging.NOTSET if level <= logging.DEBUG else max(level, logging.WARNING))
                 for name in QUIET_UNLESS_DEBUG)
    for name, new_level in {"": level, **quiet}.items():
        logger = logging.getLogger(name or None)
        _saved_levels.setdefault(name, logger.level)
        logger.setLevel(new_level)
    logging.captureWarnings(True)  # a library's warning becomes a record like any other, not a raw line
    _process.update(command=command, pid=os.getpid())
    path = log_file_path(settings, command)
    _worker.update(path=str(path) if path else None, format=settings.log_format, level=level, command=command)
    return handler
