"""`doctor`'s storage check and check_storage on SQLite and PostgreSQL; key faults stop key commands, doctor reports them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from onprem_label.cli import cli
from onprem_label.clock import utcnow
from onprem_label.config import ENV_PREFIX, load_settings
from onprem_label.db import make_engine, make_sessionmaker
from onprem_label.db.models import AuditEvent, Blob
from onprem_label.health.doctor import DEFAULT_SAMPLE
from onprem_label.health.storage import check_storage
from onprem_label.storage import EncryptedBlobStore, init_keyring, open_keyring, open_store
from onprem_label.storage import format as fmt
from onprem_label.storage.keys import create_key_file

LINE_RE = re.compile(r"(ok|warning|problem|skipped) +([a-z]+) +(\S.*)")
FAULT_PREFIXES = ("temp leftover: ", "blob with no database row: ", "database row with no blob: ",
                  "blob fails authentication: ")


@pytest.fixture(autouse=True)
def no_machine_env(monkeypatch):
    """The machine's own ONPREM_LABEL_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@dataclass
class Site:
    """A data directory, its database, and the environment that points the CLI at both."""

    data: Path
    database_url: str
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str) -> Result:
        """Invoke `onprem-label --data-dir DATA ARGS...`."""
        return CliRunner().invoke(cli, ["--data-dir", str(self.data), *args], env=self.env)

    @property
    def settings(self):
        """The settings the CLI sees."""
        return load_settings({"data_dir": str(self.data), "database_url": self.database_url}, env={})

    def store(self) -> EncryptedBlobStore:
        """The blob store, opened with the site's key."""
        return open_store(self.settings, open_keyring(self.settings))

    def query(self, fn):
        """Run fn(session) on the site's database, commit, and return its result."""
        engine = make_engine(self.settings.effective_database_url)
        try:
            with make_sessionmaker(engine)() as db:
                result = fn(db)
                db.commit()
                return result
        finally:
            engine.dispose()

    def put(self, content: bytes, *, row: bool = True) -> str:
        """Store a blob (and, unless told not to, its database row); its id."""
        ref = self.store().put(io.BytesIO(content))
        if row:
            self.query(lambda db: db.add(Blob(id=ref.blob_id, size=ref.size, created_at=utcnow())))
        return ref.blob_id

    def audit_actions(self) -> list[str]:
        """Audit actions in order."""
        return self.query(lambda db: list(db.scalars(select(AuditEvent.action).order_by(AuditEvent.id))))

    def rows(self) -> list[tuple[str, int]]:
        """Every Blob row as (id, size)."""
        return self.query(lambda db: [tuple(r) for r in
                                      db.execute(select(Blob.id, Blob.size).order_by(Blob.id))])


def _env(database_url: str) -> dict[str, str]:
    return {f"{ENV_PREFIX}DATABASE_URL": database_url} if database_url else {}


@pytest.fixture
def site(tmp_path, database_url) -> Site:
    """A data directory made by `onprem-label init`, holding three blobs with their rows."""
    site = Site(tmp_path / "data", database_url, _env(database_url))
    result = site.run("init")
    assert result.exit_code == 0, result.output
    for n in range(3):
        site.put(os.urandom(100 + n * 700))
    return site


# --- planting faults -------------------------------------------------------------------------

def plant_temp(site: Site) -> str:
    """A temp file a killed writer left behind."""
    store = site.store()
    store.tmp_dir.mkdir(exist_ok=True)
    temp = store.tmp_dir / "5f3a9c0e1d2b4a6f8e7d6c5b4a392817.part"
    temp.write_bytes(b"\0" * 300)
    hours_ago = time.time() - 2 * 3600  # older than the repair's grace period
    os.utime(temp, (hours_ago, hours_ago))
    return "5f3a9c0e1d2b4a6f8e7d6c5b4a392817.part"


def plant_orphan(site: Site) -> str:
    """A blob file with no database row."""
    return site.put(b"stored, but its row never committed", row=False)


def plant_missing(site: Site) -> str:
    """A database row whose blob file is gone."""
    blob_id = site.put(b"this file will be lost")
    site.store().path_of(blob_id).unlink()
    return blob_id


def plant_corrupt(site: Site) -> str:
    """A stored blob with a row, one byte of its body flipped."""
    blob_id = site.put(os.urandom(5000))
    path = site.store().path_of(blob_id)
    raw = bytearray(path.read_bytes())
    raw[fmt.HEADER_BYTES + 40] ^= 0x01
    path.write_bytes(bytes(raw))
    return blob_id


# fault -> (planter, its finding's severity, its finding's text)
PLANTERS = {"temp": (plant_temp, "warning", "temp leftover: {}"),
            "orphan": (plant_orphan, "warning", "blob with no database row: {}"),
            "missing": (plant_missing, "problem", "database row with no blob: {}"),
            "corrupt": (plant_corrupt, "problem", "blob fails authentication: {} (chunk 0 fails authentication)")}


def parse(result: Result) -> list[tuple[str, str, str]]:
    """(severity, check, detail) of every line of a doctor run; fails on a line of any other form.

    The last line is the summary; the JSON output (checked against the lines) must say the same.
    """
    *lines, summary = result.stdout.splitlines()
    assert summary.startswith("doctor: "), summary
    parsed = []
    for line in lines:
        match = LINE_RE.fullmatch(line)
        assert match, line
        parsed.append(match.groups())
    return parsed


def storage_findings(result: Result) -> list[tuple[str, str]]:
    """(severity, detail) of the storage check's fault lines."""
    return [(sev, detail) for sev, check, detail in parse(result)
            if check == "storage" and detail.startswith(FAULT_PREFIXES)]


def storage_lines(result: Result) -> list[tuple[str, str]]:
    """(severity, detail) of every line of the storage check."""
    return [(sev, detail) for sev, check, detail in parse(result) if check == "storage"]


def blob_tree(site: Site) -> dict[str, str]:
    """Every file under blobs/ with a digest of its content."""
    root = site.store().root
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- doctor's storage check ------------------------------------------------------------------

def test_clean_store_has_no_findings(site):
    """Blobs with matching rows: one ok line, every blob authenticated, exit 0."""
    site.put(b"")  # the empty blob is a blob too
    result = site.run("doctor", "--storage")
    assert result.exit_code == 0, result.output
    assert storage_lines(result) == [
        ("ok", "4 blobs authenticated; every blob file has its row and every row its file")]
    assert result.stdout.splitlines()[-1] == "doctor: every check ok"
    assert result.stderr == ""


def test_plain_doctor_authenticates_a_sample(site):
    """Without --storage, doctor authenticates a random sample of blobs (and compares every file with every row)."""
    for n in range(DEFAULT_SAMPLE + 2 - 3):
        site.put(os.urandom(20 + n))
    result = site.run("doctor")
    assert result.exit_code == 0, result.output
    assert storage_lines(result) == [
        ("ok", f"a random sample of {DEFAULT_SAMPLE} of {DEFAULT_SAMPLE + 2} blobs authenticated ('--storage' "
               "checks all); every blob file has its row and every row its file")]
    missing = plant_missing(site)
    again = site.run("doctor")
    assert again.exit_code == 2 and storage_findings(again) == [("problem", f"database row with no blob: {missing}")]


@pytest.mark.parametrize("fault", sorted(PLANTERS))
def test_each_planted_fault_is_reported(site, fault):
    """One planted fault: exactly one storage line naming it; a warning exits 1, a problem 2."""
    plant, severity, line = PLANTERS[fault]
    name = plant(site)
    result = site.run("doctor", "--storage")
    assert result.exit_code == {"warning": 1, "problem": 2}[severity], result.output
    assert storage_lines(result) == [(severity, line.format(name))]
    assert result.stdout.splitlines()[-1] == f"doctor: 1 {severity}"


def test_all_faults_at_once(site):
    """Every kind of fault planted together: one line each, exit 2, files and rows untouched."""
    planted = {fault: plant(site) for fault, (plant, _sev, _line) in PLANTERS.items()}
    before, rows = blob_tree(site), site.rows()
    result = site.run("doctor", "--storage")
    assert result.exit_code == 2, result.output
    assert sorted(storage_lines(result)) == sorted((PLANTERS[f][1], PLANTERS[f][2].format(n))
                                                   for f, n in planted.items())
    assert result.stdout.splitlines()[-1] == "doctor: 2 problems, 2 warnings"
    assert blob_tree(site) == before and site.rows() == rows


def test_json_output_says_what_the_lines_say(site):
    """--json: the same findings, the status and the exit code, for a monitoring system."""
    plant_missing(site)
    plant_temp(site)
    text, data = site.run("doctor", "--storage"), site.run("doctor", "--storage", "--json")
    assert data.exit_code == text.exit_code == 2
    report = json.loads(data.stdout)
    assert report["status"] == "problem" and report["exit_code"] == 2
    # (The clock's time and the free space move between the two runs.)
    def steady(found):
        return [(sev, check, "" if check in ("clock", "disk") else detail) for sev, check, detail in found]

    assert steady((f["severity"], f["check"], f["detail"]) for f in report["findings"]) == steady(parse(text))


def test_repair_removes_only_temp_leftovers(site):
    """--repair deletes the temp leftover, reports the other faults, and leaves files and rows alone."""
    planted = {fault: plant(site) for fault, (plant, _sev, _line) in PLANTERS.items()}
    before, rows = blob_tree(site), site.rows()
    result = site.run("doctor", "--storage", "--repair")
    assert result.exit_code == 2, result.output
    assert sorted(storage_findings(result)) == sorted((PLANTERS[f][1], PLANTERS[f][2].format(n))
                                                      for f, n in planted.items() if f != "temp")
    assert ("ok", "removed 1 temp leftovers (--repair)") in storage_lines(result)
    assert blob_tree(site) == {k: v for k, v in before.items() if k != f"tmp/{planted['temp']}"}
    assert site.rows() == rows
    assert site.audit_actions()[-1] == "storage:repair"
    again = site.run("doctor", "--storage")
    assert again.exit_code == 2 and not any(d.startswith("temp leftover") for _s, d in storage_findings(again))


def test_repair_of_only_temp_leftovers_exits_zero(site):
    """When temp leftovers were the only fault, --repair fixes them and the store is clean."""
    plant_temp(site)
    result = site.run("doctor", "--storage", "--repair")
    assert result.exit_code == 0, result.output
    assert storage_findings(result) == [] and "removed 1 temp leftovers" in result.stdout
    assert list(site.store().iter_temp()) == []
    assert site.run("doctor", "--storage").exit_code == 0


def test_repair_leaves_a_temp_file_younger_than_an_hour(site):
    """A temp file written just now may be an upload still at work: --repair reports it and keeps it."""
    store = site.store()
    store.tmp_dir.mkdir(exist_ok=True)
    (store.tmp_dir / "0123456789abcdef0123456789abcdef.part").write_bytes(b"\0" * 300)
    result = site.run("doctor", "--storage", "--repair")
    assert result.exit_code == 1, result.output
    assert storage_findings(result) == [("warning", "temp leftover: 0123456789abcdef0123456789abcdef.part "
                                         "(younger than an hour, perhaps still being written; left alone)")]
    assert [t.name for t in store.iter_temp()] == ["0123456789abcdef0123456789abcdef.part"]


def test_doctor_without_repair_writes_no_audit_event(site):
    """doctor only reads: without --repair not even an audit event is written."""
    plant_temp(site)
    actions = site.audit_actions()
    assert site.run("doctor", "--storage").exit_code == 1
    assert site.audit_actions() == actions


def test_repair_leaves_folders_and_links_under_tmp_alone(site):
    """--repair removes the temp file but reports (never follows or deletes) a folder or a link."""
    plant_temp(site)
    store = site.store()
    folder = store.tmp_dir / "someone-made-this"
    (folder / "inside").mkdir(parents=True)
    (folder / "inside" / "keep.txt").write_bytes(b"keep")
    target = site.settings.data_path / "precious.txt"
    target.write_bytes(b"precious")
    (store.tmp_dir / "link.part").symlink_to(target)
    result = site.run("doctor", "--storage", "--repair")
    assert result.exit_code == 1, result.output
    assert sorted(storage_findings(result)) == [
        ("warning", "temp leftover: link.part (not a plain file; left alone)"),
        ("warning", "temp leftover: someone-made-this (not a plain file; left alone)")]
    assert ("ok", "removed 1 temp leftovers (--repair)") in storage_lines(result)
    assert result.stderr == ""
    assert (folder / "inside" / "keep.txt").read_bytes() == b"keep"
    assert target.read_bytes() == b"precious" and (store.tmp_dir / "link.part").is_symlink()


def test_sample_authenticates_only_n_blobs(site):
    """--sample N authenticates N blobs; still compares every file with every row."""
    for n in range(5):
        site.put(os.urandom(50 + n))
    result = site.run("doctor", "--storage", "--sample", "2")
    assert result.exit_code == 0, result.output
    assert storage_lines(result) == [("ok", "a random sample of 2 of 8 blobs authenticated ('--storage' checks all); "
                                            "every blob file has its row and every row its file")]
    missing = plant_missing(site)
    result = site.run("doctor", "--sample", "2")
    assert result.exit_code == 2, result.output
    assert storage_findings(result) == [("problem", f"database row with no blob: {missing}")]
    bigger = site.run("doctor", "--storage", "--sample", "100")
    assert bigger.exit_code == 2 and len(storage_findings(bigger)) == 1


def _flip_header(path: Path) -> str:
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0x04  # inside the key id
    path.write_bytes(bytes(raw))
    return "which this keyring does not hold"


def _flip_tag(path: Path) -> str:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x80
    path.write_bytes(bytes(raw))
    return "fails authentication"


def _truncate_header(path: Path) -> str:
    path.write_bytes(path.read_bytes()[:fmt.HEADER_BYTES - 1])
    return "shorter than its header"


def _truncate_body(path: Path) -> str:
    path.write_bytes(path.read_bytes()[:-100])
    return "fails authentication"


def _other_blobs_file(path: Path) -> str:
    other = next(p for p in path.parent.parent.parent.rglob("*") if p.is_file() and p != path
                 and p.parent.name != "tmp")
    path.write_bytes(other.read_bytes())
    return "another blob's id"


@pytest.mark.parametrize("damage", [_flip_header, _flip_tag, _truncate_header, _truncate_body,
                                    _other_blobs_file], ids=lambda f: f.__name__.strip("_"))
def test_every_kind_of_damage_is_reported(site, damage):
    """Header, tag, truncation and a swapped-in file all show as 'fails authentication' for that blob."""
    blob_id = site.put(os.urandom(3000))
    why = damage(site.store().path_of(blob_id))
    result = site.run("doctor", "--storage")
    assert result.exit_code == 2, result.output
    ((severity, line),) = storage_findings(result)
    assert severity == "problem"
    assert line.startswith(f"blob fails authentication: {blob_id} (") and why in line


# --- check_storage, the core -----------------------------------------------------------------

def _check(site: Site, **kwargs):
    return site.query(lambda db: check_storage(db, site.store(), **kwargs))


def test_check_storage_core(site):
    """check_storage fills each list exactly, and only `repair` removes anything (temp files)."""
    planted = {fault: plant(site) for fault, (plant, _sev, _line) in PLANTERS.items()}
    report = _check(site)
    assert not report.ok
    assert report.temp_leftovers == [planted["temp"]]
    assert report.orphan_blobs == [planted["orphan"]]
    assert report.missing_blobs == [planted["missing"]]
    assert [b for b, _why in report.corrupt_blobs] == [planted["corrupt"]]
    assert report.checked == 5 and report.removed_temp == 0
    assert len(report.lines()) == 4

    sampled = _check(site, sample=2, seed=3)
    assert sampled.checked == 2 and sampled.temp_leftovers == [planted["temp"]]
    assert sampled.missing_blobs == [planted["missing"]] and sampled.orphan_blobs == [planted["orphan"]]

    repaired = _check(site, repair=True)
    assert repaired.removed_temp == 1 and repaired.temp_leftovers == []
    assert repaired.orphan_blobs and repaired.missing_blobs and repaired.corrupt_blobs
    assert list(site.store().iter_temp()) == []


def test_check_storage_clean(site):
    """On a clean store check_storage reports nothing and authenticates every blob."""
    report = _check(site)
    assert report.ok and report.lines() == [] and report.checked == 3


def test_sample_covers_every_blob_over_seeds(site):
    """Sampling is random: over several seeds a sample of one eventually finds the corrupt blob."""
    corrupt = plant_corrupt(site)
    found = [bool(_check(site, sample=1, seed=s).corrupt_blobs) for s in range(40)]
    assert any(found) and not all(found)
    assert [b for b, _ in _check(site).corrupt_blobs] == [corrupt]


# --- a missing, wrong or unreadable key stops every key command and doctor ------------------

@pytest.fixture
def keyed(tmp_path, database_url) -> Site:
    """A data directory with its key, keyring, a database at head and two blobs with rows."""
    site = Site(tmp_path / "data", database_url, _env(database_url))
    site.data.mkdir(mode=0o700, exist_ok=True)
    init_keyring(site.settings)
    site.store().root.mkdir(mode=0o700, exist_ok=True)
    site.put(b"first")
    site.put(os.urandom(3000))
    return site


def _foreign(path: Path) -> None:
    path.unlink()
    create_key_file(path)


def _missing(path: Path) -> None:
    path.unlink()


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir(mode=0o700)


def _no_permission(path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads a mode 000 file anyway")
    path.chmod(0o000)


def _short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5])


def _too_open(path: Path) -> None:
    path.chmod(0o644)


KEY_FAULTS = {"foreign": (_foreign, "does not belong to this data directory"),
              "missing": (_missing, "not found"),
              "not-a-file": (_directory, "cannot be read"),
              "no-permission": (_no_permission, "cannot be read: Permission denied"),
              "short": (_short, "holds 5 bytes, expected 32"),
              "too-open": (_too_open, "readable by others")}
COMMANDS = {"key-status": ("key", "status"), "key-rotate": ("key", "rotate"), "doctor": ("doctor",),
            "doctor-storage": ("doctor", "--storage", "--repair")}


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under `root` with a digest of its content and its mode."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mode)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("fault", sorted(KEY_FAULTS))
def test_key_fault_stops_command_and_writes_nothing(keyed, tmp_path, fault, command):
    """Wrong, missing or unreadable master key: key commands stop with one line, doctor reports it; no writes."""
    break_key, fragment = KEY_FAULTS[fault]
    key_path = keyed.settings.key_path
    plant_temp(keyed)  # something --repair would delete if it got that far
    break_key(key_path)
    rows, actions = keyed.rows(), keyed.audit_actions()
    before = snapshot(tmp_path)
    try:
        result = keyed.run(*COMMANDS[command])
        after = snapshot(tmp_path)
    finally:
        if key_path.is_file():
            key_path.chmod(0o600)  # so pytest can clean up
    if command.startswith("doctor"):
        # doctor goes on past the key: it names the fault and skips what needs the key.
        assert result.exit_code == 2, (result.output, result.exception)
        assert result.stderr == ""
        found = parse(result)
        (key_line,) = [(sev, detail) for sev, check, detail in found if check == "key"]
        assert key_line[0] == "problem" and fragment in key_line[1] and str(key_path) in key_line[1]
        assert ("skipped", "storage", "skipped: no master key") in found
        assert ("skipped", "audit", "skipped: no master key") in found
        assert any(check == "database" and sev == "ok" for sev, check, _d in found)
    else:
        assert result.exit_code == 1, (result.output, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and fragment in lines[0] and str(key_path) in lines[0]
        assert result.stdout == ""
    assert after == before
    assert keyed.rows() == rows and keyed.audit_actions() == actions
