"""The permissions check: key, data directory and the files holding data or secrets closed to others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sqlalchemy import make_url

from onprem_label.config import CONFIG_FILE_NAME, Settings
from onprem_label.db.engine import sqlite_file
from onprem_label.health.findings import OK, PROBLEM, WARNING, Finding
from onprem_label.storage.keyring import keyring_path

CHECK = "permissions"


def _mode(path: Path) -> os.stat_result | None:
    """lstat of `path`, or None when it does not exist."""
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _open_to_others(st: os.stat_result) -> bool:
    return bool(stat.S_IMODE(st.st_mode) & (stat.S_IRWXG | stat.S_IRWXO))


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def config_holds_password(settings: Settings) -> bool:
    """True when the database URL, with a password in it, comes from the config file."""
    url = settings.database_url
    if not url or settings.sources.get("database_url", "").startswith(("env ", "command line", "default")):
        return False
    try:
        return bool(make_url(url).password)
    except Exception:  # a URL SQLAlchemy cannot parse holds no password it would use
        return False


def check_permissions(settings: Settings) -> list[Finding]:
    """Findings for the data directory (0700), the key file (0600, ours) and the files beside them.

    The key file and a config file holding the database password are secrets: open to others is
    a problem. The database, keyring and checkpoint files sit inside the 0700 data directory, so
    their own mode is a second fence: open to others is a warning (a problem once the directory
    is open too, which is reported on its own line).
    """
    out: list[Finding] = []
    data = settings.data_path
    st = _mode(data)
    if st is None:
        return [Finding(CHECK, PROBLEM, f"data directory {data} does not exist (run 'onprem-label init')")]
    if _open_to_others(st):
        out.append(Finding(CHECK, PROBLEM, f"data directory {data} is open to others "
                           f"(mode {stat.S_IMODE(st.st_mode):o}); run 'chmod 700 {data}'"))
    if settings.key_source == "file":
        out += _key_file_findings(settings.key_path, data)
    out += _config_findings(data / CONFIG_FILE_NAME, settings)
    files = [keyring_path(data), settings.audit_checkpoint_path]
    database = sqlite_file(settings.effective_database_url)
    if database is not None:
        files += [database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")]
    for path in files:
        st = _mode(path)
        if st is not None and _open_to_others(st):
            out.append(Finding(CHECK, WARNING, f"{path} is open to others (mode {stat.S_IMODE(st.st_mode):o}); "
                               f"run 'chmod 600 {path}'"))
    if not out:
        out.append(Finding(CHECK, OK, "data directory, key, database and checkpoint files closed to others"))
    return out


def _config_findings(config: Path, settings: Settings) -> list[Finding]:
    """A config file holding the database password must be closed to other users.

    The file itself is judged, through a link: install.sh links /etc/onprem-label/onprem-label.toml
    (root:onprem-label 0640) into the data directory, and the service's group must read it, so
    group read is fine there; other users' bits and group write are not.
    """
    try:
        st = config.stat()
    except FileNotFoundError:
        return []
    mode = stat.S_IMODE(st.st_mode)
    if not (mode & (stat.S_IRWXO | stat.S_IWGRP)) or not config_holds_password(settings):
        return []
    real = config.resolve()
    return [Finding(CHECK, PROBLEM, f"config file {real} holds the database password and is open to "
                    f"others (mode {mode:o}); run 'chmod o-rwx,g-w {real}'")]


def _key_file_findings(key: Path, data: Path) -> list[Finding]:
    """The master key file: mode 0600 or stricter, owned by the user running this, outside the data directory."""
    st = _mode(key)
    if st is None:
        return []  # the key check names a missing key, with the fix
    out = []
    if not stat.S_ISREG(st.st_mode):
        return [Finding(CHECK, PROBLEM, f"master key file {key} is not a plain file")]
    if _open_to_others(st):
        out.append(Finding(CHECK, PROBLEM, f"master key file {key} is open to others "
                           f"(mode {stat.S_IMODE(st.st_mode):o}); run 'chmod 600 {key}'"))
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        out.append(Finding(CHECK, WARNING, f"master key file {key} belongs to {_owner(st.st_uid)}, not to the "
                           f"user running this ({_owner(os.geteuid())})"))
    if key.resolve().is_relative_to(data):
        out.append(Finding(CHECK, WARNING, f"master key file {key} is inside the data directory: a copy of the "
                           "directory (a backup) then holds the key to its own data"))
    return out
