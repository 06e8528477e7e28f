"""Master key rotation: re-wraps every data key, keeps content, survives SIGKILL and resumes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from onprem_label.cli import cli
from onprem_label.config import ENV_PREFIX, PASSPHRASE_ENV, load_settings
from onprem_label.storage import EncryptedBlobStore, init_keyring, open_keyring, open_store
from onprem_label.storage import format as fmt
from onprem_label.storage.keyring import keyring_path, next_key_path, read_state, write_state
from onprem_label.storage.keys import KeyFileError, load_key_file
from onprem_label.storage.rotation import JOURNAL_DIR, key_usage, rotate_master_key

CHUNK = 1024
PASSPHRASE = "a rotation test passphrase"


@pytest.fixture(autouse=True)
def no_machine_env(monkeypatch):
    """The machine's own ONPREM_LABEL_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


# --- helpers ---------------------------------------------------------------------------------

def site_settings(data: Path, **values):
    """Settings of a data directory with small chunks and no machine environment."""
    return load_settings({"data_dir": str(data), "blob_chunk_size": CHUNK, **values}, env={})


def make_site(data: Path, count: int, *, seed: int = 0, low: int = 0, high: int = 3 * CHUNK + 7):
    """A keyed data directory holding `count` random blobs; (settings, {blob_id: content})."""
    data.mkdir(mode=0o700, parents=True)
    settings = site_settings(data)
    keyring, _notes = init_keyring(settings)
    store = open_store(settings, keyring)
    rng = random.Random(seed)
    contents = {}
    for _ in range(count):
        content = rng.randbytes(rng.randint(low, high))
        contents[store.put(io.BytesIO(content)).blob_id] = content
    assert len(contents) == count  # random content: no two blobs share an id
    return settings, contents


def copy_site(settings, dest: Path):
    """Copy a data directory and its key files (modes kept) under `dest`; the copy's settings."""
    src = settings.data_path
    dest.mkdir(parents=True)
    shutil.copytree(src, dest / src.name)
    for key in src.parent.glob(settings.key_path.name + "*"):
        shutil.copy2(key, dest / key.name)
    return site_settings(dest / src.name)


def store_for(settings):
    """The `store_for` callable rotate_master_key wants."""
    return lambda keyring: open_store(settings, keyring)


def rotate(settings):
    """Run (or finish) a rotation in this process."""
    return rotate_master_key(settings.data_path, settings.key_path, store_for(settings))


def retired_keys(settings) -> list[Path]:
    """Key files kept by finished rotations."""
    return sorted(settings.key_path.parent.glob(settings.key_path.name + ".retired-*"))


def body_bytes(store: EncryptedBlobStore, blob_id: str) -> bytes:
    """The sealed chunks of a blob file (everything after the header)."""
    return store.path_of(blob_id).read_bytes()[fmt.HEADER_BYTES:]


def assert_all_readable(settings, keyring, contents: dict[str, bytes]) -> None:
    """Every blob verifies and reads back its exact content with `keyring`."""
    store = open_store(settings, keyring)
    assert sorted(store.iter_blobs()) == sorted(contents)
    for blob_id, content in contents.items():
        assert store.verify(blob_id) == len(content)
        with store.open(blob_id) as reader:
            assert reader.read() == content


def assert_rotated_to_new_key_only(settings, contents: dict[str, bytes]) -> str:
    """After a finished rotation: no retired key needed, all blobs on the keyring's one key."""
    for path in retired_keys(settings):
        path.unlink()
    assert not next_key_path(settings.key_path).exists()
    keyring = open_keyring(settings)
    assert len(keyring.masters) == 1
    new_id = keyring.current_id.hex()
    assert_all_readable(settings, keyring, contents)
    assert key_usage(open_store(settings, keyring)) == ({new_id: len(contents)} if contents else {})
    state = read_state(settings.data_path)
    assert state["master_key_id"] == new_id and state["rotation"] is None
    journal = settings.data_path / "blobs" / JOURNAL_DIR
    assert not journal.exists() or not any(journal.iterdir())
    return new_id


class Crash(BaseException):
    """Stands for the process dying at this point (not an Exception, so nothing catches it)."""


@contextmanager
def crash_at(step: int):
    """Make the `step`-th durable filesystem call (fsync, rename, unlink) die before it runs.

    The call count is yielded so a caller can see how many steps a whole rotation takes.
    """
    calls = [0]

    def wrap(real):
        def fake(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                raise Crash(f"step {step}: {real.__name__}{args[:1]}")
            return real(*args, **kwargs)
        return fake

    with pytest.MonkeyPatch.context() as mp:
        for name in ("fsync", "replace", "unlink"):
            mp.setattr(os, name, wrap(getattr(os, name)))
        yield calls


def add_database(settings, sqlite_template: str) -> None:
    """Give a data directory its SQLite database at head (`key rotate` records an audit event)."""
    shutil.copy(sqlite_template, settings.data_path / "onprem-label.db")


def audit_actions(settings) -> list[str]:
    """Audit actions in the data directory's SQLite database, in order."""
    from sqlalchemy import select

    from onprem_label.db import make_engine, make_sessionmaker
    from onprem_label.db.models import AuditEvent

    engine = make_engine(settings.effective_database_url)
    try:
        with make_sessionmaker(engine)() as db:
            return list(db.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
    finally:
        engine.dispose()


@contextmanager
def crash_after_rewraps(count: int):
    """Make the rotation die just before it re-wraps blob number `count` + 1."""
    from onprem_label.storage import rotation

    real, done = rotation.rewrap_blob, []

    def rewrap(*args, **kwargs):
        if len(done) == count:
            raise Crash(f"after {count} blobs")
        done.append(real(*args, **kwargs))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rotation, "rewrap_blob", rewrap)
        yield


def run_cli(data: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """`onprem-label --data-dir DATA ARGS...` through CliRunner."""
    return CliRunner().invoke(cli, ["--data-dir", str(data), *args], env=env or {})


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with a digest of its content (and its mode)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mode)
            for p in sorted(root.rglob("*"))}


# --- the core --------------------------------------------------------------------------------

def test_rotation_rewraps_every_blob_without_touching_content(tmp_path):
    """After a rotation every blob opens with the new key alone; bodies and purpose keys unchanged."""
    settings, contents = make_site(tmp_path / "data", 50, high=3 * CHUNK + 7)
    contents[open_store(settings, open_keyring(settings)).put(io.BytesIO(b"")).blob_id] = b""
    before_keyring = open_keyring(settings)
    old_id = before_keyring.current_id.hex()
    old_key = settings.key_path.read_bytes()
    store = open_store(settings, before_keyring)
    bodies = {blob_id: body_bytes(store, blob_id) for blob_id in contents}
    headers = {blob_id: store.read_header(blob_id) for blob_id in contents}
    purposes = {p: before_keyring.purpose_key(p) for p in ("totp-secrets", "blob-names", "sessions")}

    report = rotate(settings)

    assert report.old_key_id == old_id and report.new_key_id != old_id
    assert (report.rewrapped, report.already_new) == (len(contents), 0)
    assert report.retired_key_file == settings.key_path.with_name(f"data.key.retired-{old_id}")
    assert report.retired_key_file.read_bytes() == old_key  # kept for backups made before now
    assert load_key_file(settings.key_path) != old_key
    for blob_id in contents:
        assert body_bytes(store, blob_id) == bodies[blob_id]  # not re-encrypted
        header = store.read_header(blob_id)
        assert header.key_id.hex() == report.new_key_id
        assert header.wrapped_key != headers[blob_id].wrapped_key
        assert (header.salt, header.chunk_size, header.blob_id) == \
            (headers[blob_id].salt, headers[blob_id].chunk_size, headers[blob_id].blob_id)
    assert assert_rotated_to_new_key_only(settings, contents) == report.new_key_id
    after = open_keyring(settings)
    assert {p: after.purpose_key(p) for p in purposes} == purposes
    assert json.loads(keyring_path(settings.data_path).read_text())["master_key_id"] == report.new_key_id


def test_rotation_of_an_empty_store(tmp_path):
    """A data directory with no blobs rotates its key and root-key wrapping all the same."""
    settings, contents = make_site(tmp_path / "data", 0)
    totp = open_keyring(settings).purpose_key("totp-secrets")
    report = rotate(settings)
    assert (report.rewrapped, report.already_new) == (0, 0)
    assert assert_rotated_to_new_key_only(settings, contents) == report.new_key_id
    assert open_keyring(settings).purpose_key("totp-secrets") == totp


def test_second_rotation_chains_key_ids(tmp_path):
    """A second rotation starts from the first one's new key and leaves only the latest needed."""
    settings, contents = make_site(tmp_path / "data", 12)
    first = rotate(settings)
    store = open_store(settings, open_keyring(settings))
    contents[store.put(io.BytesIO(b"stored between rotations")).blob_id] = b"stored between rotations"
    second = rotate(settings)
    assert second.old_key_id == first.new_key_id
    assert len({first.old_key_id, first.new_key_id, second.new_key_id}) == 3
    assert (second.rewrapped, second.already_new) == (len(contents), 0)
    assert [p.name for p in retired_keys(settings)] == sorted(
        [f"data.key.retired-{first.old_key_id}", f"data.key.retired-{second.old_key_id}"])
    assert assert_rotated_to_new_key_only(settings, contents) == second.new_key_id


def test_blob_put_during_an_interrupted_rotation_goes_straight_to_the_new_key(tmp_path):
    """A blob stored while a rotation waits to be finished is sealed with the new key, not re-wrapped."""
    settings, contents = make_site(tmp_path / "data", 6)
    with pytest.raises(Crash), crash_after_rewraps(2):
        rotate(settings)
    to_id = read_state(settings.data_path)["rotation"]["to_key_id"]
    store = open_store(settings, open_keyring(settings))
    ref = store.put(io.BytesIO(b"stored mid-rotation"))
    contents[ref.blob_id] = b"stored mid-rotation"
    assert store.read_header(ref.blob_id).key_id.hex() == to_id
    report = rotate(settings)
    assert report.rewrapped + report.already_new == len(contents) and report.already_new >= 1
    assert assert_rotated_to_new_key_only(settings, contents) == to_id


def test_crash_at_every_durable_step_then_resume(tmp_path):
    """Dying before any fsync/rename/unlink of a rotation leaves every blob readable; a rerun finishes."""
    pristine, contents = make_site(tmp_path / "pristine" / "data", 4, low=0, high=3 * CHUNK + 7)
    old_id = open_keyring(pristine).current_id.hex()
    step, crashed = 0, 0
    while True:
        step += 1
        settings = copy_site(pristine, tmp_path / f"step{step}")
        try:
            with crash_at(step):
                rotate(settings)
        except Crash:
            crashed += 1
        else:
            break  # the whole rotation ran in fewer steps than `step`: every point was tried
        state = read_state(settings.data_path)
        interim = open_keyring(settings)  # what a restarted server would open
        if state["master_key_id"] == old_id:
            assert bytes.fromhex(old_id) in interim.masters  # the old key is not gone yet
        assert_all_readable(settings, interim, contents)
        finished = state["rotation"] is None and state["master_key_id"] != old_id
        report = rotate(settings)
        # Died after the final keyring write (only its directory fsync left): the rotation was
        # complete, so running again is a second rotation, from the new key.
        assert report.old_key_id == (state["master_key_id"] if finished else old_id), step
        assert assert_rotated_to_new_key_only(settings, contents) == report.new_key_id
        shutil.rmtree(tmp_path / f"step{step}")
    assert crashed >= 5 * len(contents) + 8, crashed  # per blob: journal, rename, header, unlink


def test_interrupted_rotation_keeps_the_old_key_and_resumes(tmp_path):
    """Mid-rotation the old key file is still in place and both keys open; resuming finishes."""
    settings, contents = make_site(tmp_path / "data", 10)
    old_key = settings.key_path.read_bytes()
    with pytest.raises(Crash), crash_after_rewraps(4):
        rotate(settings)
    state = read_state(settings.data_path)
    assert state["rotation"] is not None and state["master_key_id"] == state["rotation"]["from_key_id"]
    assert settings.key_path.read_bytes() == old_key
    assert next_key_path(settings.key_path).exists()
    keyring = open_keyring(settings)
    usage = key_usage(open_store(settings, keyring))
    assert usage == {state["rotation"]["from_key_id"]: 6, state["rotation"]["to_key_id"]: 4}
    assert keyring.current_id.hex() == state["rotation"]["to_key_id"]  # new blobs: new key
    report = rotate(settings)
    assert (report.rewrapped, report.already_new) == (6, 4)
    assert report.retired_key_file.read_bytes() == old_key
    assert assert_rotated_to_new_key_only(settings, contents) == state["rotation"]["to_key_id"]


# --- hand-made crash states ------------------------------------------------------------------

def test_torn_journal_entries_are_discarded_on_resume(tmp_path):
    """A torn journal entry, a stray journal temp file and a foreign entry never reach a blob."""
    settings, contents = make_site(tmp_path / "data", 8)
    with pytest.raises(Crash), crash_after_rewraps(3):
        rotate(settings)  # rotation recorded, some blobs moved
    store = open_store(settings, open_keyring(settings))
    journal = store.root / JOURNAL_DIR
    ids = sorted(contents)
    good_header = store.path_of(ids[0]).read_bytes()[:fmt.HEADER_BYTES]
    (journal / ids[0]).write_bytes(good_header[:57])  # torn: only part of a header
    (journal / (ids[1] + ".tmp")).write_bytes(good_header[:3])  # died before its rename
    (journal / ids[2]).write_bytes(store.path_of(ids[3]).read_bytes()[:fmt.HEADER_BYTES])  # foreign
    (journal / "not-a-blob-id").write_bytes(b"junk")
    assert_all_readable(settings, open_keyring(settings), contents)
    rotate(settings)
    assert assert_rotated_to_new_key_only(settings, contents)


def test_journal_entry_written_but_header_not_yet_rewritten(tmp_path):
    """A complete journal entry whose header write never happened is applied on resume."""
    settings, contents = make_site(tmp_path / "data", 5)
    store_cls_rewrite = EncryptedBlobStore.rewrite_header
    with pytest.MonkeyPatch.context() as mp:
        def die(self, blob_id, header):
            raise Crash(blob_id)
        mp.setattr(EncryptedBlobStore, "rewrite_header", die)
        with pytest.raises(Crash):
            rotate(settings)
    assert EncryptedBlobStore.rewrite_header is store_cls_rewrite
    journal = settings.data_path / "blobs" / JOURNAL_DIR
    pending = [p.name for p in journal.iterdir()]
    assert len(pending) == 1 and pending[0] in contents
    assert_all_readable(settings, open_keyring(settings), contents)
    report = rotate(settings)
    assert report.rewrapped + report.already_new == len(contents)
    assert assert_rotated_to_new_key_only(settings, contents)


def test_stale_journal_entry_does_not_overwrite_a_blob_stored_again(tmp_path):
    """A journal entry left by a crash must not be applied to a blob deleted and put again since.

    Same content gives the same blob id, but a fresh data key and salt: the stale header would
    make it unreadable.
    """
    settings, contents = make_site(tmp_path / "data", 3)
    with pytest.MonkeyPatch.context() as mp:
        def die(self, blob_id, header):
            raise Crash(blob_id)
        mp.setattr(EncryptedBlobStore, "rewrite_header", die)
        with pytest.raises(Crash):
            rotate(settings)
    (pending,) = [p.name for p in (settings.data_path / "blobs" / JOURNAL_DIR).iterdir()]
    store = open_store(settings, open_keyring(settings))  # the server, restarted before resuming
    assert store.delete(pending)
    assert store.put(io.BytesIO(contents[pending])).blob_id == pending
    rotate(settings)
    assert assert_rotated_to_new_key_only(settings, contents)


def test_torn_blob_header_is_repaired_from_the_journal(tmp_path):
    """A header torn mid-rewrite (power loss) is restored from its journal entry on resume."""
    settings, contents = make_site(tmp_path / "data", 4)
    with pytest.MonkeyPatch.context() as mp:
        def die(self, blob_id, header):
            raise Crash(blob_id)
        mp.setattr(EncryptedBlobStore, "rewrite_header", die)
        with pytest.raises(Crash):
            rotate(settings)
    journal = settings.data_path / "blobs" / JOURNAL_DIR
    (entry,) = journal.iterdir()
    path = open_store(settings, open_keyring(settings)).path_of(entry.name)
    raw = path.read_bytes()
    path.write_bytes(entry.read_bytes()[:60] + raw[60:])  # first sector part new, rest old
    with pytest.raises(fmt.IntegrityError):
        open_store(settings, open_keyring(settings)).verify(entry.name)
    rotate(settings)
    assert assert_rotated_to_new_key_only(settings, contents)


def test_crash_between_the_two_key_file_renames(tmp_path):
    """Old key already renamed to .retired-*, new one still .next: readable, and resume finishes."""
    settings, contents = make_site(tmp_path / "data", 6)
    old_key = settings.key_path.read_bytes()
    # Rename step 1 done, rename step 2 not: fail exactly at `os.replace(next, key)`.
    real_replace = os.replace
    with pytest.MonkeyPatch.context() as mp:
        def replace(src, dst):
            if Path(src) == next_key_path(settings.key_path):
                raise Crash("between the renames")
            return real_replace(src, dst)
        mp.setattr(os, "replace", replace)
        with pytest.raises(Crash):
            rotate(settings)
    state = read_state(settings.data_path)
    assert state["rotation"] is not None and state["master_key_id"] == state["rotation"]["to_key_id"]
    assert not settings.key_path.exists() and next_key_path(settings.key_path).exists()
    (retired,) = retired_keys(settings)
    assert retired.read_bytes() == old_key
    assert_all_readable(settings, open_keyring(settings), contents)
    status = run_cli(settings.data_path, "key", "status", "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["rotation_in_progress"] is True
    rotate(settings)
    assert retired.read_bytes() == old_key
    assert assert_rotated_to_new_key_only(settings, contents) == state["rotation"]["to_key_id"]


def test_crash_between_renames_built_by_hand(tmp_path):
    """The same state rebuilt from a finished rotation (key file moved back to .next) resumes."""
    settings, contents = make_site(tmp_path / "data", 4)
    started = rotate(settings)
    state = read_state(settings.data_path)
    state["rotation"] = {"from_key_id": started.old_key_id, "to_key_id": started.new_key_id,
                         "started_at": "2026-11-28T09:00:00+00:00"}
    write_state(settings.data_path, state)
    os.rename(settings.key_path, next_key_path(settings.key_path))
    assert_all_readable(settings, open_keyring(settings), contents)
    report = rotate(settings)
    assert (report.rewrapped, report.already_new) == (0, len(contents))
    assert assert_rotated_to_new_key_only(settings, contents) == started.new_key_id


def test_torn_next_key_from_a_crash_before_the_rotation_was_recorded(tmp_path):
    """A .next key file cut short by a crash (nothing wrapped with it yet) does not block rotating."""
    settings, contents = make_site(tmp_path / "data", 3)
    torn = next_key_path(settings.key_path)
    torn.write_bytes(b"")
    torn.chmod(0o600)
    assert read_state(settings.data_path)["rotation"] is None
    assert_all_readable(settings, open_keyring(settings), contents)
    report = rotate(settings)
    assert report.rewrapped == len(contents)
    assert assert_rotated_to_new_key_only(settings, contents) == report.new_key_id


def test_unrecorded_next_key_is_reused(tmp_path):
    """A whole .next key left by a run that died before recording the rotation becomes the new key."""
    settings, contents = make_site(tmp_path / "data", 3)
    from onprem_label.storage import rotation

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Crash):
        def die(*args):
            raise Crash("before keyring.json records the rotation")
        mp.setattr(rotation, "write_state", die)
        rotate(settings)
    assert read_state(settings.data_path)["rotation"] is None
    waiting = fmt.key_id_of(load_key_file(next_key_path(settings.key_path))).hex()
    assert rotate(settings).new_key_id == waiting
    assert assert_rotated_to_new_key_only(settings, contents) == waiting


# --- SIGKILL at random points ----------------------------------------------------------------

ROTATE_SCRIPT = """
import sys
from onprem_label.config import load_settings
from onprem_label.storage import open_store
from onprem_label.storage.rotation import rotate_master_key

settings = load_settings({"data_dir": sys.argv[1]}, env={})
print("start", flush=True)
report = rotate_master_key(settings.data_path, settings.key_path,
                           lambda keyring: open_store(settings, keyring))
print("done", report.rewrapped, flush=True)
"""


def start_rotation(settings, script: Path) -> subprocess.Popen:
    """A rotation in a child process, returned once it has imported everything and begun."""
    os.sync()  # the copy's dirty pages would otherwise be flushed by the child's first fsync
    child = subprocess.Popen([sys.executable, str(script), str(settings.data_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)})
    assert child.stdout.readline().strip() == "start", child.stderr.read()
    return child


def test_sigkill_at_random_points_then_resume(tmp_path):
    """Rotation killed with SIGKILL at random moments: readable meanwhile, finished by a rerun."""
    pristine, contents = make_site(tmp_path / "pristine" / "data", 300, seed=7,
                                   low=CHUNK, high=2 * CHUNK)
    old_id = open_keyring(pristine).current_id.hex()
    script = tmp_path / "rotate.py"
    script.write_text(ROTATE_SCRIPT)

    timing = copy_site(pristine, tmp_path / "timing")
    child = start_rotation(timing, script)
    began = time.monotonic()
    out, err = child.communicate(timeout=300)
    duration = time.monotonic() - began
    assert child.returncode == 0 and out.startswith("done 300"), err
    assert duration > 0.2, duration  # long enough that random delays land mid-rotation

    outcomes = []
    for seed in range(15):  # at least 5 seeds; more only until a kill lands mid-rewrap
        if seed >= 5 and any(o[2] and len(o[4]) == 2 for o in outcomes):
            break
        # 0.8 x: under a loaded machine a rerun can be faster than the timing run
        delay = random.Random(seed).uniform(0, 0.8 * duration)
        settings = copy_site(pristine, tmp_path / f"seed{seed}")
        child = start_rotation(settings, script)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
        killed = child.returncode == -signal.SIGKILL
        state = read_state(settings.data_path)
        interim = open_keyring(settings)  # old + new key, as a restarted server would
        usage = key_usage(open_store(settings, interim))
        outcomes.append((seed, round(delay, 3), killed, state["rotation"] is not None, usage))
        assert_all_readable(settings, interim, contents)
        report = rotate(settings)
        if killed:
            assert report.old_key_id == old_id
        assert assert_rotated_to_new_key_only(settings, contents) != old_id
        shutil.rmtree(tmp_path / f"seed{seed}")
    mid_rewrap = [o for o in outcomes if o[2] and len(o[4]) == 2]
    assert mid_rewrap, (duration, outcomes)  # at least one kill caught blobs on both keys


# --- the CLI ---------------------------------------------------------------------------------

def test_key_status_counts_blobs_per_key_and_shows_a_rotation_under_way(tmp_path, sqlite_template):
    """`key status` gives blob counts per key id, and says when a rotation needs finishing."""
    settings, contents = make_site(tmp_path / "data", 9)
    add_database(settings, sqlite_template)
    data = settings.data_path
    old_id = open_keyring(settings).current_id.hex()
    result = run_cli(data, "key", "status")
    assert result.exit_code == 0, result.output
    assert f"master key in use: {old_id} (file)" in result.stdout
    assert f"  {old_id}: 9 blobs" in result.stdout and "rotation" not in result.stdout

    with pytest.raises(Crash), crash_after_rewraps(4):
        rotate(settings)
    new_id = read_state(data)["rotation"]["to_key_id"]
    result = run_cli(data, "key", "status")
    assert result.exit_code == 0, result.output
    assert "a rotation is under way: run 'onprem-label key rotate' to finish it" in result.stdout
    assert f"master key in use: {new_id}" in result.stdout
    assert f"  {old_id}: 5 blobs" in result.stdout and f"  {new_id}: 4 blobs" in result.stdout
    as_json = json.loads(run_cli(data, "key", "status", "--json").stdout)
    assert as_json == {"current_key_id": new_id, "key_source": "file", "rotation_in_progress": True,
                       "blobs_by_key": {old_id: 5, new_id: 4}}

    result = run_cli(data, "key", "rotate")
    assert result.exit_code == 0, result.output
    assert f"master key rotated: {old_id} -> {new_id}; 5 blobs re-wrapped, 4 already on the new key" \
        in result.stdout
    assert f"old key kept as {settings.key_path}.retired-{old_id}" in result.stdout
    assert audit_actions(settings)[-1] == "key:rotate"
    result = run_cli(data, "key", "status", "--json")
    assert json.loads(result.stdout) == {"current_key_id": new_id, "key_source": "file",
                                         "rotation_in_progress": False, "blobs_by_key": {new_id: 9}}
    assert assert_rotated_to_new_key_only(settings, contents) == new_id


def test_key_rotate_cli_twice(tmp_path, sqlite_template):
    """`key rotate` run twice chains keys; status then shows every blob on the latest key."""
    settings, contents = make_site(tmp_path / "data", 5)
    add_database(settings, sqlite_template)
    first = run_cli(settings.data_path, "key", "rotate")
    assert first.exit_code == 0, first.output
    second = run_cli(settings.data_path, "key", "rotate")
    assert second.exit_code == 0, second.output
    latest = open_keyring(settings).current_id.hex()
    assert "5 blobs re-wrapped, 0 already on the new key" in second.stdout
    assert f"-> {latest};" in second.stdout
    assert first.stdout.split("-> ")[1].split(";")[0] == second.stdout.split(": ")[1].split(" ->")[0]
    status = run_cli(settings.data_path, "key", "status")
    assert f"  {latest}: 5 blobs" in status.stdout
    assert assert_rotated_to_new_key_only(settings, contents) == latest


def _passphrase_site(tmp_path, sqlite_template):
    """A passphrase-keyed data directory with two blobs and a database; (settings, contents)."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    settings = site_settings(data, key_source="passphrase")
    keyring, _ = init_keyring(settings, passphrase=PASSPHRASE)
    store = open_store(settings, keyring)
    contents = {store.put(io.BytesIO(c)).blob_id: c for c in (b"one blob", b"another blob" * 300)}
    add_database(settings, sqlite_template)
    return settings, contents


def test_key_rotate_passphrase_key(tmp_path, sqlite_template):
    """A passphrase master key rotates to a new passphrase: blobs open with it alone, purpose keys kept."""
    settings, contents = _passphrase_site(tmp_path, sqlite_template)
    names_before = open_keyring(settings, passphrase=PASSPHRASE).purpose_key("blob-names")
    new = "a different and longer passphrase"
    env = {f"{ENV_PREFIX}KEY_SOURCE": "passphrase", PASSPHRASE_ENV: PASSPHRASE,
           "ONPREM_LABEL_NEW_KEY_PASSPHRASE": new}
    result = run_cli(settings.data_path, "key", "rotate", env=env)
    assert result.exit_code == 0, result.output
    with pytest.raises(KeyFileError, match="passphrase is wrong"):
        open_keyring(settings, passphrase=PASSPHRASE)
    keyring = open_keyring(settings, passphrase=new)
    assert keyring.purpose_key("blob-names") == names_before
    store = open_store(settings, keyring)
    for blob_id, content in contents.items():
        assert store.open(blob_id).read() == content
    assert set(key_usage(store)) == {keyring.current_id.hex()}


def test_key_rotate_passphrase_needs_both_and_the_right_one(tmp_path, sqlite_template):
    """Without the new passphrase, or with a wrong current one, `key rotate` is one line and writes nothing."""
    settings, _ = _passphrase_site(tmp_path, sqlite_template)
    before = snapshot(tmp_path)
    base = {f"{ENV_PREFIX}KEY_SOURCE": "passphrase"}
    missing = run_cli(settings.data_path, "key", "rotate", env={**base, PASSPHRASE_ENV: PASSPHRASE})
    wrong = run_cli(settings.data_path, "key", "rotate",
                    env={**base, PASSPHRASE_ENV: "not the passphrase",
                         "ONPREM_LABEL_NEW_KEY_PASSPHRASE": "whatever comes next"})
    for result, text in ((missing, "ONPREM_LABEL_NEW_KEY_PASSPHRASE"), (wrong, "passphrase is wrong")):
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], lines
    assert snapshot(tmp_path) == before


def test_key_rotate_with_the_new_key_gone_is_one_line(tmp_path, sqlite_template):
    """A recorded rotation whose .next key was deleted stops `key rotate` with one line; no writes."""
    settings, contents = make_site(tmp_path / "data", 4)
    add_database(settings, sqlite_template)
    with pytest.raises(Crash), crash_after_rewraps(0):  # rotation recorded, no blob moved
        rotate(settings)
    next_key_path(settings.key_path).unlink()
    before = snapshot(tmp_path)
    result = run_cli(settings.data_path, "key", "rotate")
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: the new master key ({next_key_path(settings.key_path)}) of the rotation under "
        "way is missing"]
    assert snapshot(tmp_path) == before


def damage_header(store: EncryptedBlobStore, blob_id: str) -> None:
    """Flip a bit in a blob's wrapped data key."""
    path = store.path_of(blob_id)
    raw = bytearray(path.read_bytes())
    raw[fmt.HEADER_BYTES - fmt.MAC_BYTES - fmt.BLOB_ID_BYTES - 3] ^= 0x10
    path.write_bytes(bytes(raw))


def test_damaged_blob_stops_key_rotate_with_one_line_naming_it(tmp_path, sqlite_template):
    """A blob whose header fails authentication pauses the rotation with one line; then it resumes."""
    settings, contents = make_site(tmp_path / "data", 6)
    add_database(settings, sqlite_template)
    bad = sorted(contents)[3]
    old_id = open_keyring(settings).current_id.hex()
    damage_header(open_store(settings, open_keyring(settings)), bad)
    result = run_cli(settings.data_path, "key", "rotate")
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # a handled error, not a traceback
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: blob {bad} cannot be re-wrapped") and "doctor --storage" in last
    assert read_state(settings.data_path)["rotation"] is not None  # paused, not finished
    status = json.loads(run_cli(settings.data_path, "key", "status", "--json").stdout)
    assert status["rotation_in_progress"] and status["blobs_by_key"][old_id] >= 1  # the bad one
    good = {k: v for k, v in contents.items() if k != bad}
    store = open_store(settings, open_keyring(settings))
    for blob_id, content in good.items():
        with store.open(blob_id) as reader:
            assert reader.read() == content
    store.delete(bad)  # the operator's decision, after doctor named it
    result = run_cli(settings.data_path, "key", "rotate")
    assert result.exit_code == 0, result.output
    assert assert_rotated_to_new_key_only(settings, good)


def test_doctor_warns_of_an_unfinished_rotation(tmp_path, sqlite_template):
    """Mid-rotation (both keys present): doctor's key check is a warning naming `key rotate`; every blob opens."""
    settings, contents = make_site(tmp_path / "data", 5)
    add_database(settings, sqlite_template)
    with pytest.raises(Crash), crash_after_rewraps(2):
        rotate(settings)
    result = run_cli(settings.data_path, "doctor", "--json", "--storage")
    report = json.loads(result.stdout)
    key = [f for f in report["findings"] if f["check"] == "key"]
    assert [f["severity"] for f in key] == ["warning"]
    assert "a key rotation is under way" in key[0]["detail"] and "onprem-label key rotate" in key[0]["detail"]
    # (make_site stores blobs without rows: those are warnings; none fails authentication.)
    storage = [f for f in report["findings"] if f["check"] == "storage"]
    assert len(storage) == 5 and all(f["detail"].startswith("blob with no database row: ") for f in storage)


def test_key_status_with_an_unparseable_blob_is_one_line(tmp_path):
    """A blob file cut shorter than its header stops `key status` with one line naming it."""
    settings, contents = make_site(tmp_path / "data", 3)
    bad = sorted(contents)[1]
    path = open_store(settings, open_keyring(settings)).path_of(bad)
    path.write_bytes(path.read_bytes()[:40])
    result = run_cli(settings.data_path, "key", "status")
    assert result.exit_code == 1 and result.stdout == "", result.output
    assert result.stderr.strip().splitlines() == [
        f"error: blob {bad} has a damaged header (blob file shorter than its header); "
        "run 'onprem-label doctor --storage'"]


@pytest.mark.parametrize("command", [("key", "status"), ("key", "rotate"), ("doctor",)])
def test_current_key_missing_mid_rotation_is_named(tmp_path, sqlite_template, command):
    """Mid-rotation with the old key file gone: one line saying it is missing (doctor: a finding), and no writes."""
    settings, contents = make_site(tmp_path / "data", 5)
    add_database(settings, sqlite_template)
    with pytest.raises(Crash), crash_after_rewraps(2):
        rotate(settings)
    settings.key_path.unlink()
    before = snapshot(tmp_path)
    result = run_cli(settings.data_path, *command)
    message = (f"master key file {settings.key_path} not found (run 'onprem-label init', "
               "or set key_file to where the key is kept)")
    if command == ("doctor",):  # doctor reports it among its other checks, exit 2 (a problem)
        assert result.exit_code == 2, (result.output, result.exception)
        assert f"problem  key          {message}" in result.stdout.splitlines()
    else:
        assert result.exit_code == 1, (result.output, result.exception)
        (line,) = result.stderr.strip().splitlines()
        assert line == f"error: {message}"
    assert snapshot(tmp_path) == before
