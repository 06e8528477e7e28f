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
# Pillow's TiffImagePlugin logs each tag's value at DEBUG (a description, an artist, a date).
ALWAYS_QUIET = ("pynetdicom", "pydicom", "highdicom", "PIL")
# Chatty at DEBUG or INFO without telling an operator anything (alembic: two lines per schema check).
QUIET_UNLESS_DEBUG = ("alembic", "waitress")
# An exception's message may quote its input (a parser's error on a hostile DICOM may carry a
# patient's name; PostgreSQL's DETAIL line quotes the row: `Key (username)=(jdoe) already exists`),
# so a record's trace shows by default only the types and frames (file, line, function), plus a
# database error's SQLSTATE and constraint. extra=SHOW_EXCEPTION_TEXT opts in to the full text,
# for an exception whose message is known to hold no data; HIDE_EXCEPTION_TEXT (the default) stays
# for the call sites that say so explicitly.
SHOW_EXCEPTION_TEXT = {"show_exception_text": True}
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


def _type_name(kind: type) -> str:
    module = getattr(kind, "__module__", "builtins")
    return kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"


def _database_details(value: BaseException) -> list[str]:
    """A driver error's code and constraint: what names the fault, never the row's values."""
    details = []
    sqlstate = getattr(value, "sqlstate", None) or getattr(value, "pgcode", None)  # psycopg 3 / 2
    if isinstance(sqlstate, str):
        details.append(f"sqlstate {sqlstate}")
    diag = getattr(value, "diag", None)
    for part in ("constraint_name", "table_name"):
        name = getattr(diag, part, None) if diag is not None else None
        if isinstance(name, str) and name:
            details.append(f"{part.split('_')[0]} {name}")
    errorname = getattr(value, "sqlite_errorname", None)
    if isinstance(errorname, str):
        details.append(errorname)
    return details


def _hidden_trace(value: BaseException, trace, seen: set[int]) -> list[str]:
    """The trace of `value` (and of its cause or context) without any message: types and frames."""
    seen.add(id(value))
    lines: list[str] = []
    chained = value.__cause__ if value.__cause__ is not None else (
        None if value.__suppress_context__ else value.__context__)
    if chained is not None and id(chained) not in seen:
        lines += _hidden_trace(chained, chained.__traceback__, seen)
        lines.append("\nThe above exception was the direct cause of the following exception:\n"
                     if value.__cause__ is not None else
                     "\nDuring handling of the above exception, another exception occurred:\n")
    lines.append("Traceback (most recent call last):")
    lines += [f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}'
              for frame in traceback.extract_tb(trace)]
    details = ["message not logged", *_database_details(value)]
    orig = getattr(value, "orig", None)  # sqlalchemy.exc.DBAPIError wraps the driver's error
    if isinstance(orig, BaseException) and orig is not value:
        details += [d for d in _database_details(orig) if d not in details]
    lines.append(f"{_type_name(type(value))} ({'; '.join(details)})")
    return lines


def _exception_text(record: logging.LogRecord) -> str | None:
    if not record.exc_info or record.exc_info[0] is None:
        return None
    kind, value, trace = record.exc_info
    if getattr(record, "show_exception_text", False) and not getattr(record, "hide_exception_text", False):
        return "".join(traceback.format_exception(kind, value, trace)).rstrip()
    if value is None:
        value = kind()
    return "\n".join(_hidden_trace(value, trace, set()))


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """time, level, logger, message, then the context's and the call's own fields, then the trace."""
    fields: dict[str, Any] = {"time": _utc_time(record), "level": record.levelname.lower(),
                              "logger": record.name, "message": record.getMessage()}
    fields.update(_process)
    fields.update(_context.get())  # formatting runs in the thread that logged
    fields.update((k, v) for k, v in vars(record).items()
                  if k not in _STANDARD and k not in ("hide_exception_text", "show_exception_text", _FORMATTED))
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
        # json.dumps escapes C0 controls; DEL, C1 (U+0085 among them), U+2028 and U+2029 would pass
        # raw, and line-splitting readers (Python's splitlines, JavaScript) break a record on some.
        return json.dumps(scrubbed, ensure_ascii=False, separators=(",", ":")).translate(_JSON_ESCAPES)


_LINE_BREAKING = [*range(0x7F, 0xA0), 0x2028, 0x2029]
_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in _LINE_BREAKING}  # only inside strings: valid JSON
_KV_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
               **{code: f"\\x{code:02x}" for code in range(0x20) if code not in (0x09, 0x0A, 0x0D)},
               **{code: (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}") for code in _LINE_BREAKING}}
_BARE = re.compile(r"[A-Za-z0-9_./:@+<>\[\]-]+")


def _kv_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    return f'"{text.translate(_KV_ESCAPES)}"'


class KeyValueFormatter(_OnceFormatter):
    """One line of `key=value` pairs (logfmt): values with spaces or quotes are quoted, escaped."""

    def format_fields(self, fields: dict[str, Any]) -> str:
        """The fields as one key=value line, secrets masked."""
        return " ".join(f"{key}={_kv_value(value if key in _OWN_FIELDS else _scrub(value))}"
                        for key, value in fields.items())


def _open_private(path: str, encoding: str | None, errors: str | None):
    """`path` for appending; a file this call creates is FILE_MODE whatever the umask (systemd's
    UMask=0077 would make it 0600, shutting out the log readers' group)."""
    flags = os.O_WRONLY | os.O_APPEND
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
    except FileExistsError:  # an existing file keeps the mode it has (an operator may have narrowed it)
        fd = os.open(path, flags)
    return os.fdopen(fd, "a", encoding=encoding, errors=errors)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Size-rotated log file whose new files (first and after each rollover) are mode 0640."""

    def _open(self):
        return _open_private(self.baseFilename, self.encoding, self.errors)


class PrivateWatchedFileHandler(logging.handlers.WatchedFileHandler):
    """A worker process's view of its parent's log file: reopened after the parent rotates it."""

    def _open(self):
        return _open_private(self.baseFilename, self.encoding, self.errors)


# waitress logs an error raised inside a streamed response body (after Flask's handlers are done)
# as "Exception while serving <path>": a path may name what a request is about; the route is in the
# request's access line. (Its trace shows types and frames only, as every trace does.)
_WAITRESS_PATH_LINES = ("Exception while serving ", "Client disconnected while serving ")


class _WaitressPathFilter(logging.Filter):
    """Drops the request path from waitress's per-request lines; keeps the rest of the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("waitress") and isinstance(record.msg, str):
            for prefix in _WAITRESS_PATH_LINES:
                if record.msg.startswith(prefix):
                    record.msg, record.args = prefix + "a request (path not logged)", ()
        return True


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
    handler.addFilter(_WaitressPathFilter())
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
    handler.addFilter(_WaitressPathFilter())
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
