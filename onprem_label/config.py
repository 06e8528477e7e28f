"""Settings: one declarative registry, loaded from explicit values, env, TOML file and defaults."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

ENV_PREFIX = "ONPREM_LABEL_"
CONFIG_FILE_NAME = "onprem-label.toml"
# Written first into a data directory a restore fills and removed as its last step: a restore cut
# off by SIGKILL or a power cut leaves it, and every command then refuses the half-made directory.
RESTORE_MARKER = "RESTORE-UNFINISHED"
ROLES = ("admin", "manager", "labeler", "reviewer", "auditor")
# Secrets read from the environment only, never from the config file or `config show`.
PASSPHRASE_ENV = ENV_PREFIX + "KEY_PASSPHRASE"
NEW_PASSPHRASE_ENV = ENV_PREFIX + "NEW_KEY_PASSPHRASE"  # only for `key rotate`
SECRET_ENV_VARS = (PASSPHRASE_ENV, NEW_PASSPHRASE_ENV)


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting, its source and the reason."""


@dataclass(frozen=True)
class Setting:
    """One entry of the registry: name, type, default, help and optional checks."""

    name: str
    type: str  # "str" | "int" | "bool" | "path" | "list"
    default: Any
    help: str
    secret: bool = False
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None

    @property
    def env_var(self) -> str:
        """The environment variable that sets this setting."""
        return ENV_PREFIX + self.name.upper()


def _check_ip_address(value: str) -> str | None:
    # Waitress reads "*" as "trust every peer": anyone could then forge X-Forwarded-For.
    if value:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return "expected the proxy's IP address (one literal address, no names or wildcards)"
    return None


def _check_lan_address(value: str) -> str | None:
    # A literal address: the server must not depend on name resolution to keep its audit copy.
    return _check_ip_address(value) and "expected one literal IP address of a host on the LAN"


def _check_ae_title(value: str) -> str | None:
    # PS3.5 6.2, VR AE: up to 16 characters of the default repertoire, no backslash or controls.
    if not 0 < len(value.strip()) <= 16 or any(not " " <= c <= "~" or c == "\\" for c in value):
        return "expected 1 to 16 printable ASCII characters without a backslash (a DICOM AE title)"
    return None


def _check_bind_address(value: str) -> str | None:
    return _check_ip_address(value) if value else "expected one literal IP address"


def _check_database_url(value: str) -> str | None:
    if value and not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
        return "expected a sqlite:/// or postgresql+psycopg:// URL"
    return None


# The registry. Order here is the order of `config show` and of the example file.
REGISTRY: tuple[Setting, ...] = (
    Setting("data_dir", "path", "onprem-data",
            "Directory holding the database (SQLite), encrypted blobs and the config file."),
    Setting("database_url", "str", "",
            "SQLAlchemy URL; empty means SQLite in the data directory. "
            "PostgreSQL: postgresql+psycopg://user:password@host/dbname",
            secret=True, check=_check_database_url),
    Setting("key_file", "path", "",
            "Master key file (32 random bytes, mode 0600). Empty means '<data_dir>.key', "
            "beside the data directory, so a copy of the data directory alone holds no key."),
    Setting("key_source", "str", "file",
            "Where the master key comes from: 'file' (key_file) or 'passphrase' (derived with "
            "scrypt from ONPREM_LABEL_KEY_PASSPHRASE, or asked for at start-up).",
            choices=("file", "passphrase")),
    Setting("blob_chunk_size", "int", 1 << 20,
            "Plaintext bytes per encrypted chunk of newly stored blobs (ranged reads fetch whole "
            "chunks).", minimum=1 << 10, maximum=1 << 26),
    Setting("host", "str", "127.0.0.1",
            "Address to listen on. Anything but loopback needs trusted_proxy or --insecure-http."),
    Setting("port", "int", 8080, "TCP port to listen on.", minimum=1, maximum=65535),
    Setting("threads", "int", 8, "Worker threads of the waitress server.", minimum=1, maximum=256),
    Setting("trusted_proxy", "str", "",
            "Address of the TLS reverse proxy whose X-Forwarded-* headers are trusted "
            "(e.g. 127.0.0.1). Empty: no proxy is trusted. Needs https = true.",
            check=_check_ip_address),
    Setting("https", "bool", False,
            "Set when users reach the server over TLS (through the proxy): cookies get "
            "Secure and the __Host- prefix, and HSTS is sent."),
    Setting("session_idle_minutes", "int", 15,
            "A login session ends after this many minutes without a request.", minimum=1, maximum=1440),
    Setting("session_absolute_hours", "int", 12,
            "A login session ends this many hours after login, active or not.", minimum=1, maximum=168),
    Setting("lockout_threshold", "int", 5,
            "Failed logins within lockout_window_minutes that lock an account.", minimum=1, maximum=100),
    Setting("lockout_window_minutes", "int", 15,
            "Window in which failed logins are counted.", minimum=1, maximum=1440),
    Setting("lockout_minutes", "int", 15,
            "How long a locked account stays locked (an admin can unlock it sooner).",
            minimum=1, maximum=10080),
    Setting("address_rate_limit", "int", 30,
            "Login attempts allowed per client address within address_rate_window_minutes.",
            minimum=1, maximum=10000),
    Setting("address_rate_window_minutes", "int", 15,
            "Window of the per-address login rate limit.", minimum=1, maximum=1440),
    Setting("require_totp_roles", "list", [],
            "Roles whose members must enrol a TOTP second factor before they can work.",
            choices=ROLES),
    Setting("upload_max_file_bytes", "int", 2 << 30,
            "Largest file accepted by upload or ingest, in bytes; an upload request larger than this "
            "(plus 1 MiB for the form) gets 413 before its body is read.",
            minimum=1024, maximum=1 << 40),
    Setting("ingest_zip_max_files", "int", 100_000,
            "Most members read from one zip archive by `ingest`; a larger archive is rejected.",
            minimum=1, maximum=10_000_000),
    Setting("ingest_zip_max_bytes", "int", 64 << 30,
            "Most uncompressed bytes read from one zip archive by `ingest` (zip bombs).",
            minimum=1024, maximum=1 << 44),
    Setting("ingest_workers", "int", 0,
            "Processes that decode and de-identify files during `ingest`; 0 = one per CPU core.",
            minimum=0, maximum=64),
    Setting("ingest_decode_timeout", "int", 600,
            "Seconds one file may take to be decoded and de-identified in its worker process; a "
            "file that takes longer (a decoder caught in a loop by a hostile file) is rejected.",
            minimum=5, maximum=86400),
    Setting("dicom_ae_title", "str", "ONPREMLABEL",
            "AE title of the DICOM receiver (`dicom-listen`); callers must address it by this title.",
            check=_check_ae_title),
    Setting("dicom_bind", "str", "127.0.0.1",
            "Address the DICOM receiver listens on. Default loopback: set the server's LAN address "
            "once the callers allowed per project (project setting dicom_callers) are configured.",
            check=_check_bind_address),
    Setting("dicom_port", "int", 11112, "TCP port of the DICOM receiver.", minimum=1, maximum=65535),
    Setting("raster_max_pixels", "int", 89_478_485,
            "Largest picture (width x height) accepted; larger ones are rejected as possible "
            "decompression bombs before their pixels are decoded. The default is Pillow's own "
            "warning threshold; Pillow refuses anything above twice that.",
            minimum=1, maximum=178_956_970),
    Setting("deid_date_shift_days", "int", 0,
            "0: dates are removed as the DICOM Basic Confidentiality Profile says. Any other value: "
            "every date is shifted by this many days instead (Retain Longitudinal Temporal "
            "Information with Modified Dates Option); keep the value secret.",
            minimum=-36500, maximum=36500, secret=True),
    Setting("deid_linkage", "bool", False,
            "Keep an encrypted table linking original DICOM identifiers to the new ones (for "
            "re-identification by an authorised person). Off: originals cannot be traced back.",),
    Setting("audit_checkpoint_file", "path", "",
            "Append-only file of audit checkpoints (event count, head hash, HMAC), kept outside the "
            "database so cutting off the tail of the log is caught. Empty means "
            "'<data_dir>/audit/checkpoints.log'; a separate disk or a write-once mount is better."),
    Setting("audit_checkpoint_every", "int", 1000,
            "Write an audit checkpoint each time the log grows past a multiple of this many events.",
            minimum=1, maximum=10_000_000),
    Setting("audit_checkpoint_minutes", "int", 10,
            "Also write an audit checkpoint when this many minutes have passed since the last one "
            "(at the first event after start, too), so a quiet site's newest events are covered.",
            minimum=1, maximum=10_080),
    Setting("audit_syslog_host", "str", "",
            "Forward every audit event as RFC 5424 syslog over TCP to this host on the LAN "
            "(empty: no forwarding). The database stays the record; forwarding never delays a request.",
            check=_check_lan_address),
    Setting("audit_syslog_port", "int", 514, "TCP port of the syslog receiver.", minimum=1, maximum=65535),
    Setting("audit_source_id", "str", "onprem-label",
            "This server's name in forwarded syslog messages and DICOM audit messages (AuditSourceID)."),
    Setting("log_level", "str", "info", "Application log level.",
            choices=("debug", "info", "warning", "error")),
    Setting("doctor_min_free_disk_mb", "int", 1024,
            "`onprem-label doctor` warns when the data directory's filesystem (or the checkpoint "
            "file's) has fewer MiB free than this.", minimum=0, maximum=1 << 30),
    Setting("log_format", "str", "json",
            "Format of the application log of serve, dicom-listen, ingest and export: 'json' (one JSON "
            "object per line, what log shippers parse) or 'keyvalue' (key=value pairs, logfmt).",
            choices=("json", "keyvalue")),
    Setting("log_file", "path", "",
            "Application log file. Empty: standard error, which journald keeps under systemd. A path: "
            "that file, rotated by size; {command} in it becomes the command's name (serve, "
            "dicom-listen, ...), since each process needs a file of its own."),
    Setting("log_max_mb", "int", 100,
            "A log file is rotated when it would grow past this many MiB.", minimum=1, maximum=100_000),
    Setting("log_backups", "int", 10,
            "Rotated log files kept (file.1 is the newest); older ones are deleted.", minimum=1, maximum=1000),
)

BY_NAME = {s.name: s for s in REGISTRY}


def _coerce(setting: Setting, raw: Any, source: str) -> Any:
    """Turn a raw value (string from env, or TOML value) into the setting's type, or raise."""

    def fail(reason: str) -> SettingsError:
        return SettingsError(f"setting '{setting.name}' from {source}: {reason} (got {raw!r})")

    if setting.type in ("str", "path"):
        if not isinstance(raw, str):
            raise fail("expected a string")
        value: Any = raw
    elif setting.type == "int":
        if isinstance(raw, bool):
            raise fail("expected an integer")
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise fail("expected an integer") from None
        if setting.minimum is not None and value < setting.minimum or (
            setting.maximum is not None and value > setting.maximum
        ):
            raise fail(f"expected an integer from {setting.minimum} to {setting.maximum}")
    elif setting.type == "bool":
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on"):
            value = True
        elif isinstance(raw, str) and raw.strip().lower() in ("0", "false", "no", "off", ""):
            value = False
        else:
            raise fail("expected true or false")
    elif setting.type == "list":
        if isinstance(raw, str):
            value = [part for part in raw.replace(",", " ").split() if part]
        elif isinstance(raw, (list, tuple)) and all(isinstance(v, str) for v in raw):
            value = list(raw)
        else:
            raise fail("expected a list of strings")
    else:  # pragma: no cover - registry programming error
        raise AssertionError(setting.type)

    if setting.choices is not None:
        items = value if setting.type == "list" else [value]
        bad = [v for v in items if v not in setting.choices]
        if bad:
            raise fail("expected one of " + ", ".join(setting.choices))
    if setting.check is not None:
        reason = setting.check(value)
        if reason:
            raise fail(reason)
    return value


class Settings:
    """The effective settings: attribute access, plus where each value came from."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str]):
        self._values = values
        self.sources = sources

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def as_dict(self) -> dict[str, Any]:
        """All values, unmasked (for code, never for display)."""
        return dict(self._values)

    @property
    def data_path(self) -> Path:
        """The data directory as an absolute path."""
        return Path(self.data_dir).expanduser().resolve()

    @property
    def key_path(self) -> Path:
        """The master key file: the setting, or '<data_dir>.key' beside the data directory."""
        if self.key_file:
            return Path(self.key_file).expanduser().resolve()
        data = self.data_path
        return data.with_name(data.name + ".key")

    @property
    def audit_checkpoint_path(self) -> Path:
        """The audit checkpoint file: the setting, or '<data_dir>/audit/checkpoints.log'."""
        if self.audit_checkpoint_file:
            return Path(self.audit_checkpoint_file).expanduser().resolve()
        return self.data_path / "audit" / "checkpoints.log"

    @property
    def effective_database_url(self) -> str:
        """The database URL, defaulting to SQLite inside the data directory."""
        return self.database_url or f"sqlite:///{self.data_path / 'onprem-label.db'}"

    @property
    def is_sqlite(self) -> bool:
        """True when the database is SQLite."""
        return self.effective_database_url.startswith("sqlite:")

    def masked(self) -> dict[str, str]:
        """Values for display, secrets replaced by a mask (passwords inside URLs too)."""
        shown = {}
        for s in REGISTRY:
            value = self._values[s.name]
            if s.name == "database_url" and value:
                shown[s.name] = _mask_url_password(value)
            elif s.secret and value:
                shown[s.name] = "********"
            else:
                shown[s.name] = value
        return shown


def _mask_url_password(url: str) -> str:
    """Hide the password part of a database URL, keep the rest so an operator can check it."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:********@{host}" if ":" in creds else url


def load_settings(explicit: Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Resolve every setting: explicit > env > <data_dir>/onprem-label.toml > default."""
    explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
    env = os.environ if env is None else env
    unknown = set(explicit) - set(BY_NAME)
    if unknown:
        raise SettingsError(f"setting '{sorted(unknown)[0]}' from explicit value: unknown setting")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def resolve(setting: Setting, file_values: Mapping[str, Any], file_label: str) -> None:
        if setting.name in explicit:
            raw, source = explicit[setting.name], "command line"
        elif setting.env_var in env:
            raw, source = env[setting.env_var], f"env {setting.env_var}"
        elif setting.name in file_values:
            raw, source = file_values[setting.name], file_label
        else:
            values[setting.name], sources[setting.name] = setting.default, "default"
            return
        values[setting.name] = _coerce(setting, raw, source)
        sources[setting.name] = source

    # data_dir first: it says where the file is, so it cannot come from the file.
    resolve(BY_NAME["data_dir"], {}, "")
    config_file = Path(values["data_dir"]).expanduser() / CONFIG_FILE_NAME
    file_values = read_config_file(config_file)
    if "data_dir" in file_values:
        raise SettingsError(f"setting 'data_dir' from {config_file}: cannot be set inside the data directory")
    for name in file_values:
        if name not in BY_NAME:
            raise SettingsError(f"setting '{name}' from {config_file}: unknown setting")
    for setting in REGISTRY[1:]:
        resolve(setting, file_values, str(config_file))

    settings = Settings(values, sources)
    if settings.https and not settings.trusted_proxy:
        raise SettingsError(f"setting 'https' from {sources['https']}: needs trusted_proxy "
                            "(the server speaks plain HTTP; TLS ends at the proxy)")
    if settings.trusted_proxy and not settings.https:
        raise SettingsError(f"setting 'trusted_proxy' from {sources['trusted_proxy']}: needs "
                            "https = true (the proxy is there to end TLS; without it cookies "
                            "would lose Secure)")
    return settings


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse the TOML config file; a missing file is empty, a broken one is a SettingsError."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise SettingsError(f"config file {path}: cannot be read ({exc.strerror})") from None
