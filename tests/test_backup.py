"""`backup DEST`, `backup verify DEST` and `restore SRC` through the CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select, text

from onprem_label.audit.checkpoints import parse_line
from onprem_label.audit.site import chain_for
from onprem_label.audit.verify import verify_chain
from onprem_label.backup.manifest import MANIFEST_FILE
from onprem_label.cli import cli
from onprem_label.config import ENV_PREFIX, load_settings
from onprem_label.db import make_engine
from onprem_label.db.engine import read_connection
from onprem_label.db.models import AuditEvent, Blob
from onprem_label.storage import open_keyring, open_store
from onprem_label.storage.keys import create_key_file

pytestmark = pytest.mark.usefixtures("pg_client_programs")


@pytest.fixture(autouse=True)
def no_machine_env(monkeypatch):
    """The machine's own ONPREM_LABEL_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@dataclass
class Site:
    """A data directory and the environment that points the CLI at its database."""

    data: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, env: dict[str, str] | None = None) -> Result:
        """Invoke `onprem-label --data-dir DATA ARGS...`."""
        return CliRunner().invoke(cli, ["--data-dir", str(self.data), *args], env={**self.env, **(env or {})})

    @property
    def settings(self):
        """The settings the CLI sees."""
        return load_settings({"data_dir": str(self.data)}, env=self.env)

    def count(self, model, *where) -> int:
        """Rows of a model in the site's database."""
        engine = make_engine(self.settings.effective_database_url)
        try:
            with engine.connect() as conn:
                return conn.scalar(select(func.count()).select_from(model).where(*where))
        finally:
            engine.dispose()


def _ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _fails(result: Result, text_part: str) -> str:
    """The one error line of a failed command, which must contain `text_part`."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and text_part in lines[0], result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def site(tmp_path, empty_database_url) -> Site:
    """An initialised site with the demo project: four encrypted images, an audit trail, a checkpoint."""
    site = Site(tmp_path / "data", {"ONPREM_LABEL_DATABASE_URL": empty_database_url} if empty_database_url else {})
    _ok(site.run("init", "--demo"))
    return site


def _restore_args(url: str) -> list[str]:
    return ["--database-url", url] if url else []


def _assert_nothing_restored(target: Path, restore_url: str) -> None:
    """A failed restore left no data directory and, for PostgreSQL, no table in the target database."""
    assert not target.exists()
    if restore_url:
        assert _tables(restore_url) == []


def _tables(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
    finally:
        engine.dispose()


def test_backup_verify_restore_round_trip(site, tmp_path, restore_url):
    """A backup verifies; restored into a new directory its blobs, counts and audit chain all check out."""
    dest = tmp_path / "backup"
    out = _ok(site.run("backup", str(dest)))
    assert "backup complete" in out and "master key is not in it" in out
    body = json.loads((dest / MANIFEST_FILE).read_text())
    assert body["blobs"]["count"] == site.count(Blob) >= 4
    assert body["master_key_id"] == open_keyring(site.settings).current_id.hex()
    # The live database holds the backup:create event, after the snapshot (so not in it).
    assert site.count(AuditEvent, AuditEvent.action == "backup:create") == 1
    assert body["audit"]["last_id"] == site.count(AuditEvent) - 1
    assert "OK" in _ok(site.run("backup", "verify", str(dest)))
    key = site.settings.key_path.read_bytes()
    for path in dest.rglob("*"):
        assert not path.is_file() or key not in path.read_bytes(), f"{path} holds the master key"

    new = Site(tmp_path / "restored", {})
    shutil.copy(site.settings.key_path, tmp_path / "restored.key")
    out = _ok(new.run("restore", str(dest), *_restore_args(restore_url)))
    assert "restored" in out and f"{body['blobs']['count']} of {body['blobs']['count']} blobs authenticated" in out
    assert new.settings.effective_database_url == (restore_url or f"sqlite:///{tmp_path / 'restored' / 'onprem-label.db'}")
    engine = make_engine(new.settings.effective_database_url)
    try:
        with read_connection(engine, snapshot=True) as conn:
            for table, rows in body["database"]["rows"].items():
                expected = rows + (1 if table == "audit_events" else 0)  # + backup:restore
                assert conn.scalar(text(f'SELECT count(*) FROM "{table}"')) == expected, table
            result = verify_chain(conn, chain_for(new.settings, open_keyring(new.settings)))
            assert result.ok and result.checkpoints >= 1, result.as_dict()
            last = conn.execute(select(AuditEvent.action).order_by(AuditEvent.id.desc()).limit(1)).scalar()
            assert last == "backup:restore"
            ids = list(conn.scalars(select(Blob.id)))
    finally:
        engine.dispose()
    store = open_store(new.settings, open_keyring(new.settings))
    assert all(store.verify(blob_id) >= 0 for blob_id in ids)
    assert "doctor: every check ok" in _ok(new.run("doctor", "--storage"))
    assert "OK" in _ok(new.run("audit", "verify"))


def test_key_file_inside_the_data_directory_never_goes_into_a_backup(tmp_path, empty_database_url):
    """Even with key_file inside the data directory, no file of the backup holds the key."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    env = {"ONPREM_LABEL_KEY_FILE": str(data / "master.key")}
    if empty_database_url:
        env["ONPREM_LABEL_DATABASE_URL"] = empty_database_url
    site = Site(data, env)
    _ok(site.run("init", "--demo"))
    key = (data / "master.key").read_bytes()
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    names = json.loads((dest / MANIFEST_FILE).read_text())["files"]
    assert not any("master.key" in name for name in names)
    for path in dest.rglob("*"):
        assert not path.is_file() or key not in path.read_bytes(), f"{path} holds the master key"


def test_restore_with_the_wrong_key_fails_clearly_and_leaves_nothing(site, tmp_path, restore_url):
    """Another site's key: one clear line, no data directory, no checkpoint file, an untouched database."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    create_key_file(tmp_path / "restored.key")  # a fresh key that does not belong to the backup
    new = Site(tmp_path / "restored", {})
    line = _fails(new.run("restore", str(dest), *_restore_args(restore_url)),
                  "master key does not open this backup")
    assert "nothing was restored" in line
    _assert_nothing_restored(tmp_path / "restored", restore_url)


def test_restore_refuses_a_non_empty_directory_or_database(site, tmp_path, restore_url):
    """A data directory with anything in it is refused (and left as it was); so is a database with tables."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    target = tmp_path / "restored"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    shutil.copy(site.settings.key_path, tmp_path / "restored.key")
    _fails(Site(target).run("restore", str(dest), *_restore_args(restore_url)), "is not empty")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    if restore_url:
        # The live database as the target: refused before anything is copied.
        other = tmp_path / "other"
        shutil.copy(site.settings.key_path, tmp_path / "other.key")
        _fails(Site(other).run("restore", str(dest), "--database-url",
                               site.settings.effective_database_url), "target database is not empty")
        assert not other.exists()


def test_restore_brings_a_backup_into_an_existing_empty_directory(site, tmp_path, restore_url):
    """An empty (existing) directory is a fine target."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    target = tmp_path / "restored"
    target.mkdir(mode=0o700)
    shutil.copy(site.settings.key_path, tmp_path / "restored.key")
    _ok(Site(target).run("restore", str(dest), *_restore_args(restore_url)))
    assert (target / "keyring.json").exists() and (target / "blobs").is_dir()


def _linked_settings_target(tmp_path: Path, restore_url: str) -> tuple[Path, Path]:
    """A data directory holding only a link to a settings file elsewhere, as install.sh leaves it."""
    etc = tmp_path / "etc" / "onprem-label.toml"
    etc.parent.mkdir()
    etc.write_text(f'# the site\'s own settings\ndatabase_url = "{restore_url}"\n' if restore_url
                   else "# the site's own settings\n")
    target = tmp_path / "restored"
    target.mkdir(mode=0o700)
    (target / "onprem-label.toml").symlink_to(etc)
    return target, etc


def test_restore_keeps_a_data_directory_whose_only_file_is_its_settings_link(site, tmp_path, restore_url):
    """install.sh links /etc's settings into the data directory: restore keeps that link and restores under it."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    target, etc = _linked_settings_target(tmp_path, restore_url)
    before = etc.read_text()
    shutil.copy(site.settings.key_path, tmp_path / "restored.key")
    _ok(Site(target).run("restore", str(dest)))
    assert (target / "onprem-label.toml").is_symlink() and etc.read_text() == before
    assert (target / "keyring.json").exists()
    restored = Site(target)
    assert restored.settings.effective_database_url == (restore_url or f"sqlite:///{target / 'onprem-label.db'}")
    assert restored.count(Blob) == site.count(Blob)


def test_restore_under_a_kept_settings_link_refuses_options_and_undoes_around_it(site, tmp_path, restore_url):
    """Options that would rewrite the kept settings are refused; a failed restore leaves the link alone."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    target, etc = _linked_settings_target(tmp_path, restore_url)
    shutil.copy(site.settings.key_path, tmp_path / "restored.key")
    _fails(Site(target).run("restore", str(dest), "--database-url", "sqlite:////nowhere/x.db"),
           "kept as the restore's settings")
    (tmp_path / "restored.key").unlink()
    create_key_file(tmp_path / "restored.key")  # now a key that does not belong to the backup
    _fails(Site(target).run("restore", str(dest)), "master key does not open this backup")
    assert [p.name for p in target.iterdir()] == ["onprem-label.toml"]
    assert (target / "onprem-label.toml").is_symlink()
    if restore_url:
        assert _tables(restore_url) == []


def _blob_file(dest: Path) -> Path:
    return sorted(p for p in (dest / "blobs").rglob("*") if p.is_file())[0]


def test_verify_finds_changed_missing_and_extra_files(site, tmp_path):
    """A flipped byte, a deleted file and an added file are each named; verify exits 1."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    blob = _blob_file(dest)
    raw = bytearray(blob.read_bytes())
    raw[-5] ^= 1
    blob.write_bytes(bytes(raw))
    (dest / "keyring.json").unlink()
    (dest / "blobs" / "stray").write_bytes(b"x")
    result = site.run("backup", "verify", str(dest), "--no-key")
    assert result.exit_code == 1
    assert f"problem: changed: {blob.relative_to(dest).as_posix()}" in result.output
    assert "problem: missing: keyring.json" in result.output
    assert "problem: extra file not in the manifest: blobs/stray" in result.output
    assert site.count(AuditEvent, AuditEvent.action == "backup:verify", AuditEvent.outcome == "failure") == 1


def test_verify_with_the_key_catches_a_blob_and_manifest_rewritten_together(site, tmp_path):
    """Tampering that also fixes the checksums passes --no-key, but not the key's checks."""
    import hashlib

    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    blob = _blob_file(dest)
    raw = bytearray(blob.read_bytes())
    raw[-5] ^= 1
    blob.write_bytes(bytes(raw))
    body = json.loads((dest / MANIFEST_FILE).read_text())
    body["files"][blob.relative_to(dest).as_posix()]["sha256"] = hashlib.sha256(raw).hexdigest()
    (dest / MANIFEST_FILE).write_text(json.dumps(body))
    _ok(site.run("backup", "verify", str(dest), "--no-key"))
    result = site.run("backup", "verify", str(dest))
    assert result.exit_code == 1
    assert "manifest.json does not authenticate" in result.output
    assert f"blob {blob.name} fails authentication" in result.output


def test_restore_of_a_damaged_backup_fails_and_leaves_nothing(site, tmp_path, restore_url):
    """A changed blob stops the restore with the file's name; the target is removed again."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    blob = _blob_file(dest)
    raw = bytearray(blob.read_bytes())
    raw[100] ^= 1
    blob.write_bytes(bytes(raw))
    shutil.copy(site.settings.key_path, tmp_path / "restored.key")
    _fails(Site(tmp_path / "restored").run("restore", str(dest), *_restore_args(restore_url)),
           f"{blob.relative_to(dest).as_posix()} in the backup does not match its checksum")
    _assert_nothing_restored(tmp_path / "restored", restore_url)


def test_restore_failing_after_the_database_is_in_undoes_the_database(site, tmp_path, restore_url):
    """A chain that does not verify is found after the database is restored: it is dropped again."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    # A checkpoint beyond the snapshot (signed with the site's audit key): the restored chain looks cut.
    checkpoints = dest / "audit" / "checkpoints.log"
    last = parse_line(checkpoints.read_text().splitlines()[-1])
    from onprem_label.audit.checkpoints import make_checkpoint

    chain = chain_for(site.settings, open_keyring(site.settings))
    forged = make_checkpoint(chain.key, last.count + 50, last.head)
    checkpoints.write_text(checkpoints.read_text() + forged.line() + "\n")
    body = json.loads((dest / MANIFEST_FILE).read_text())
    import hashlib

    body["files"]["audit/checkpoints.log"] = {"size": checkpoints.stat().st_size,
                                               "sha256": hashlib.sha256(checkpoints.read_bytes()).hexdigest()}
    from onprem_label.backup import manifest

    keyring = open_keyring(site.settings)
    manifest.write_manifest(dest, manifest.seal(body, keyring.purpose_key(manifest.MAC_PURPOSE)))
    shutil.copy(site.settings.key_path, tmp_path / "restored.key")
    _fails(Site(tmp_path / "restored").run("restore", str(dest), *_restore_args(restore_url)),
           "restored audit chain does not verify: truncated")
    _assert_nothing_restored(tmp_path / "restored", restore_url)


def test_an_incomplete_backup_is_never_reported_complete(site, tmp_path, restore_url):
    """Without its manifest a backup folder is incomplete for verify (exit 1) and refused by restore."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    (dest / MANIFEST_FILE).unlink()
    _fails(site.run("backup", "verify", str(dest)), "incomplete backup")
    shutil.copy(site.settings.key_path, tmp_path / "restored.key")
    _fails(Site(tmp_path / "restored").run("restore", str(dest), *_restore_args(restore_url)), "incomplete backup")
    assert not (tmp_path / "restored").exists()


def test_backup_refuses_a_non_empty_destination_or_one_inside_the_data_directory(site, tmp_path):
    """The destination must be new or empty, and outside the data directory; nothing is written."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    _fails(site.run("backup", str(full)), "is not empty")
    assert [p.name for p in full.iterdir()] == ["x"]
    _fails(site.run("backup", str(site.data / "backups")), "inside the data directory")
    assert not (site.data / "backups").exists()
    assert site.count(AuditEvent, AuditEvent.action == "backup:create") == 0


def test_backup_refuses_to_run_during_a_key_rotation(site, tmp_path):
    """A rotation under way rewrites blob headers: the backup says to finish it first."""
    keyring_file = site.data / "keyring.json"
    state = json.loads(keyring_file.read_text())
    keyring_file.write_text(json.dumps({**state, "rotation": {"to_key_id": "00" * 8}}))
    _fails(site.run("backup", str(tmp_path / "backup")), "rotation is under way")
    assert not (tmp_path / "backup").exists()


def test_verify_without_the_key_at_hand_says_how_to_go_on(site, tmp_path):
    """A key that does not open the backup is one line naming --key-file and --no-key."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    create_key_file(tmp_path / "other.key")
    _fails(site.run("backup", "verify", str(dest), "--key-file", str(tmp_path / "other.key")), "--no-key")


def test_restore_with_a_key_file_elsewhere_keeps_it_in_the_restored_settings(site, tmp_path, restore_url):
    """--key-file (and --database-url) go into the restored onprem-label.toml: later commands find them."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    shutil.copy(site.settings.key_path, keys / "site.key")
    new = Site(tmp_path / "restored", {})
    _ok(new.run("restore", str(dest), "--key-file", str(keys / "site.key"), *_restore_args(restore_url)))
    settings = new.settings
    assert settings.key_path == keys / "site.key" and settings.sources["key_file"].endswith("onprem-label.toml")
    assert settings.database_url == restore_url
    assert "doctor: every check ok" in _ok(new.run("doctor", "--storage"))


def test_backup_of_a_sqlite_url_with_no_file_refuses_and_creates_nothing(site, tmp_path):
    """A database_url naming a SQLite file that is not there is an error, not an empty "complete" backup."""
    missing = tmp_path / "elsewhere" / "live.db"
    missing.parent.mkdir()
    dest = tmp_path / "backup"
    _fails(site.run("backup", str(dest), env={"ONPREM_LABEL_DATABASE_URL": f"sqlite:///{missing}"}),
           f"no database at {missing}")
    assert not missing.exists() and not dest.exists()


def test_restore_refuses_settings_that_name_another_sqlite_database(site, tmp_path):
    """Checks, upgrade and the restore's audit event go into the restored database, never into one elsewhere."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    shutil.copy(site.settings.key_path, tmp_path / "restored.key")
    elsewhere = tmp_path / "live-elsewhere.db"
    _fails(Site(tmp_path / "restored").run("restore", str(dest), "--database-url", f"sqlite:///{elsewhere}"),
           "not the restored")
    assert not elsewhere.exists()
    _assert_nothing_restored(tmp_path / "restored", "")


def test_a_manifest_that_drops_the_keyring_is_called_tampered(site, tmp_path):
    """Without keyring.json nothing could authenticate the manifest: verify, even --no-key, says so."""
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    body = json.loads((dest / MANIFEST_FILE).read_text())
    del body["files"]["keyring.json"]
    (dest / MANIFEST_FILE).write_text(json.dumps(body))
    (dest / "keyring.json").unlink()
    result = site.run("backup", "verify", str(dest), "--no-key")
    assert result.exit_code == 1 and "tampered" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_site_without_a_checkpoint_file_backs_up_and_restores(site, tmp_path, restore_url):
    """A backup of a site whose checkpoint file was lost restores (or refuses) in one line, never a traceback."""
    site.settings.audit_checkpoint_path.unlink()
    dest = tmp_path / "backup"
    _ok(site.run("backup", str(dest)))
    assert not (dest / "audit" / "checkpoints.log").exists()
    shutil.copy(site.settings.key_path, tmp_path / "restored.key")
    result = Site(tmp_path / "restored").run("restore", str(dest), *_restore_args(restore_url))
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 0 or len([line for line in result.output.splitlines()
                                         if line.startswith("error: ")]) == 1, result.output


def test_an_existing_empty_destination_is_closed_to_others(site, tmp_path):
    """The backup folder holds a plaintext database: an existing empty one is made 0700 first."""
    dest = tmp_path / "backup"
    dest.mkdir(mode=0o755)
    dest.chmod(0o755)
    _ok(site.run("backup", str(dest)))
    assert dest.stat().st_mode & 0o777 == 0o700


def test_create_backup_itself_refuses_a_missing_sqlite_file(site, tmp_path):
    """The core refuses too (not only the CLI's database check): sqlite3 would make an empty file and back it up."""
    from onprem_label.backup.errors import BackupError
    from onprem_label.backup.snapshot import create_backup

    missing = tmp_path / "live.db"
    settings = load_settings({"data_dir": str(site.data), "database_url": f"sqlite:///{missing}"}, env={})
    with pytest.raises(BackupError, match="no SQLite database at"):
        create_backup(settings, open_keyring(site.settings), tmp_path / "backup")
    assert not missing.exists() and not (tmp_path / "backup").exists()
