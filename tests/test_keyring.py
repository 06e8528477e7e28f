"""Master key and keyring: first-run creation, reopening, purpose keys, and refusals that change nothing."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
from pathlib import Path

import pytest

from onprem_label.config import ENV_PREFIX, PASSPHRASE_ENV, load_settings
from onprem_label.storage import KeyFileError, init_keyring, open_keyring, open_store
from onprem_label.storage.format import key_id_of
from onprem_label.storage.keyring import KEYRING_FILE, passphrase_key

PURPOSES = ["blob-names", "sessions", "audit", "totp"]
PASSPHRASE = "four quiet lanterns over the harbour"


@pytest.fixture(autouse=True)
def no_machine_env(monkeypatch):
    """The machine's own ONPREM_LABEL_* variables (a passphrase above all) must not leak in."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def settings(tmp_path):
    """Key-file settings for a data directory that does not exist yet."""
    return load_settings({"data_dir": str(tmp_path / "data")}, env={})


@pytest.fixture
def pass_settings(tmp_path):
    """Passphrase settings for a data directory that does not exist yet."""
    return load_settings({"data_dir": str(tmp_path / "data"), "key_source": "passphrase"}, env={})


def snapshot(root: Path) -> dict:
    """Every path under `root` with its mode, mtime and (for files) content."""
    result = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        result[path] = (st.st_mode, st.st_mtime_ns, path.read_bytes() if path.is_file() else None)
    return result


def mode_of(path: Path) -> int:
    """Permission bits of a file."""
    return stat.S_IMODE(path.stat().st_mode)


# --- key file mode -----------------------------------------------------------------------------

def test_first_run_creates_key_file_beside_the_data_dir(settings, tmp_path):
    """init makes a 32-byte, mode 0600 key file next to (not in) the data dir and a 0600 keyring."""
    keyring, notes = init_keyring(settings)
    key_path = tmp_path / "data.key"
    assert settings.key_path == key_path
    assert key_path.read_bytes() and len(key_path.read_bytes()) == 32
    assert mode_of(key_path) == 0o600
    ring = tmp_path / "data" / KEYRING_FILE
    assert mode_of(ring) == 0o600
    assert not list((tmp_path / "data").glob("*.key"))
    state = json.loads(ring.read_text())
    assert state["master_key_id"] == key_id_of(key_path.read_bytes()).hex()
    assert state["passphrase"] is None
    assert keyring.current_id == key_id_of(key_path.read_bytes())
    assert keyring.masters == {keyring.current_id: key_path.read_bytes()}
    assert len(notes) == 1 and str(key_path) in notes[0]


def test_second_run_opens_the_same_keyring(settings, tmp_path):
    """A second init (or open) changes no file and yields the same keys."""
    first, _ = init_keyring(settings)
    before = snapshot(tmp_path)
    second, notes = init_keyring(settings)
    third = open_keyring(settings)
    assert notes == []
    assert snapshot(tmp_path) == before
    for again in (second, third):
        assert (again.current_id, again.masters, again.root_key) == \
            (first.current_id, first.masters, first.root_key)


def test_purpose_keys_are_stable_and_distinct(settings):
    """Purpose keys are the same on every open, differ per purpose, and are neither master nor root."""
    first, _ = init_keyring(settings)
    later = open_keyring(settings)
    keys = {purpose: first.purpose_key(purpose) for purpose in PURPOSES}
    assert all(later.purpose_key(p) == k and len(k) == 32 for p, k in keys.items())
    assert len(set(keys.values())) == len(PURPOSES)
    assert not set(keys.values()) & {first.root_key, *first.masters.values()}


def test_two_data_dirs_get_different_keys(tmp_path):
    """Two initialised data dirs share neither master key nor purpose keys."""
    one, _ = init_keyring(load_settings({"data_dir": str(tmp_path / "one")}, env={}))
    two, _ = init_keyring(load_settings({"data_dir": str(tmp_path / "two")}, env={}))
    assert one.current_id != two.current_id
    assert one.purpose_key("blob-names") != two.purpose_key("blob-names")


def test_blobs_survive_reopening(settings):
    """A blob stored under one opening reads back, and gets the same id, under the next."""
    data = os.urandom(5000)
    keyring, _ = init_keyring(settings)
    ref = open_store(settings, keyring).put(io.BytesIO(data))
    store = open_store(settings, open_keyring(settings))
    with store.open(ref.blob_id) as reader:
        assert reader.read() == data
    assert store.put(io.BytesIO(data)) == ref


def test_foreign_key_file_is_refused_and_nothing_written(settings, tmp_path):
    """A valid key that is not this data dir's makes init and open fail, naming it; no file changes."""
    init_keyring(settings)
    fd = os.open(settings.key_path, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, os.urandom(32))
    os.close(fd)
    before = snapshot(tmp_path)
    for attempt in (init_keyring, open_keyring):
        with pytest.raises(KeyFileError, match="does not belong") as caught:
            attempt(settings)
        assert str(settings.key_path) in str(caught.value)
        assert snapshot(tmp_path) == before


def test_missing_key_file_is_refused_and_not_recreated(settings, tmp_path):
    """With a keyring but no key file, init does not make a new key: it fails with 'not found'."""
    init_keyring(settings)
    settings.key_path.unlink()
    before = snapshot(tmp_path)
    for attempt in (init_keyring, open_keyring):
        with pytest.raises(KeyFileError, match="not found"):
            attempt(settings)
        assert snapshot(tmp_path) == before
    assert not settings.key_path.exists()


def _make_directory(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


def _make_world_readable(path: Path) -> None:
    path.chmod(0o644)


def _make_unreadable(path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads a mode-000 file; covered by the directory and mode cases")
    path.chmod(0o000)


def _make_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:31])


BROKEN_KEY_FILES = {
    "directory": (_make_directory, "cannot be read"),
    "mode-0644": (_make_world_readable, "readable by others"),
    "mode-000": (_make_unreadable, "cannot be read"),
    "31-bytes": (_make_short, "holds 31 bytes"),
}


@pytest.mark.parametrize("breakage", BROKEN_KEY_FILES.values(), ids=BROKEN_KEY_FILES.keys())
def test_unusable_key_file_is_refused_and_nothing_written(settings, tmp_path, breakage):
    """A key file that is a directory, too open, unreadable or the wrong size: clear error, no change."""
    break_it, message = breakage
    init_keyring(settings)
    break_it(settings.key_path)
    before = snapshot(tmp_path)
    for attempt in (init_keyring, open_keyring):
        with pytest.raises(KeyFileError, match=message):
            attempt(settings)
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("breakage", BROKEN_KEY_FILES.values(), ids=BROKEN_KEY_FILES.keys())
def test_unusable_key_file_stops_first_run_before_anything_is_made(settings, tmp_path, breakage):
    """On a first run, an unusable pre-existing key file stops init before a data dir or keyring exists."""
    break_it, message = breakage
    settings.key_path.write_bytes(os.urandom(32))
    settings.key_path.chmod(0o600)
    break_it(settings.key_path)
    before = snapshot(tmp_path)
    with pytest.raises(KeyFileError, match=message):
        init_keyring(settings)
    assert snapshot(tmp_path) == before
    assert not settings.data_path.exists()


def test_first_run_adopts_an_existing_good_key_file(settings):
    """A key file put in place before init (e.g. restored from escrow) is used, not replaced."""
    key = os.urandom(32)
    settings.key_path.write_bytes(key)
    settings.key_path.chmod(0o600)
    keyring, notes = init_keyring(settings)
    assert keyring.current_id == key_id_of(key)
    assert settings.key_path.read_bytes() == key
    assert notes == []


def test_open_without_init_is_refused(settings, tmp_path):
    """Opening a data dir that was never initialised fails clearly and creates nothing."""
    with pytest.raises(KeyFileError, match="no keyring"):
        open_keyring(settings)
    assert list(tmp_path.iterdir()) == []


# --- passphrase mode ---------------------------------------------------------------------------

def test_passphrase_mode_round_trip(pass_settings, tmp_path):
    """A passphrase keyring records salt and scrypt parameters, makes no key file and reopens."""
    first, notes = init_keyring(pass_settings, passphrase=PASSPHRASE)
    assert notes == []
    assert not pass_settings.key_path.exists()
    state = json.loads((tmp_path / "data" / KEYRING_FILE).read_text())
    params = state["passphrase"]
    assert len(base64.b64decode(params["salt"])) >= 16
    assert params["log_n"] >= 17 and params["r"] == 8 and params["p"] == 1
    assert state["master_key_id"] == key_id_of(passphrase_key(PASSPHRASE, params)).hex()
    again = open_keyring(pass_settings, passphrase=PASSPHRASE)
    assert (again.current_id, again.root_key) == (first.current_id, first.root_key)
    assert again.purpose_key("blob-names") == first.purpose_key("blob-names")


def test_passphrase_from_the_environment(pass_settings, monkeypatch):
    """Without an explicit passphrase, init and open take it from ONPREM_LABEL_KEY_PASSPHRASE."""
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    first, _ = init_keyring(pass_settings)
    monkeypatch.delenv(PASSPHRASE_ENV)
    assert open_keyring(pass_settings, passphrase=PASSPHRASE).root_key == first.root_key


def test_passphrase_salt_differs_between_data_dirs(tmp_path):
    """The same passphrase gives different master keys in two data dirs (random salt)."""
    ids = []
    for name in ("one", "two"):
        settings = load_settings({"data_dir": str(tmp_path / name), "key_source": "passphrase"}, env={})
        ids.append(init_keyring(settings, passphrase=PASSPHRASE)[0].current_id)
    assert ids[0] != ids[1]


def test_wrong_passphrase_is_refused_and_nothing_written(pass_settings, tmp_path):
    """A wrong passphrase fails with 'passphrase is wrong' on init and open; no file changes."""
    init_keyring(pass_settings, passphrase=PASSPHRASE)
    before = snapshot(tmp_path)
    for attempt in (init_keyring, open_keyring):
        with pytest.raises(KeyFileError, match="passphrase is wrong"):
            attempt(pass_settings, passphrase=PASSPHRASE + "!")
        assert snapshot(tmp_path) == before


def test_missing_passphrase_is_refused(pass_settings, tmp_path):
    """Passphrase mode with no passphrase given or in the environment fails on init and open."""
    with pytest.raises(KeyFileError, match=PASSPHRASE_ENV):
        init_keyring(pass_settings)
    assert list(tmp_path.iterdir()) == []
    init_keyring(pass_settings, passphrase=PASSPHRASE)
    with pytest.raises(KeyFileError, match="passphrase"):
        open_keyring(pass_settings)


# --- damaged keyring.json ----------------------------------------------------------------------

def _flip_root_key(state: dict) -> dict:
    raw = bytearray(base64.b64decode(state["root_key"]))
    raw[5] ^= 1
    return {**state, "root_key": base64.b64encode(bytes(raw)).decode()}


DAMAGE = {
    "empty": lambda text, state: "",
    "truncated": lambda text, state: text[:len(text) // 2],
    "not-json": lambda text, state: "\x00\x01garbage",
    "null": lambda text, state: "null",
    "a-list": lambda text, state: "[1, 2]",
    "other-format": lambda text, state: json.dumps({**state, "format": 99}),
    "no-master-key-id": lambda text, state: json.dumps({k: v for k, v in state.items()
                                                        if k != "master_key_id"}),
    "master-key-id-not-hex": lambda text, state: json.dumps({**state, "master_key_id": "zz"}),
    "master-key-id-a-number": lambda text, state: json.dumps({**state, "master_key_id": 7}),
    "other-master-key-id": lambda text, state: json.dumps({**state, "master_key_id": "00" * 8}),
    "no-root-key": lambda text, state: json.dumps({k: v for k, v in state.items() if k != "root_key"}),
    "root-key-not-base64": lambda text, state: json.dumps({**state, "root_key": "!!!"}),
    "root-key-short": lambda text, state: json.dumps({**state, "root_key": "AAAA"}),
    "root-key-flipped": lambda text, state: json.dumps(_flip_root_key(state)),
    "rotation-garbage": lambda text, state: json.dumps({**state, "rotation": {"bogus": 1}}),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_keyring_file_is_refused_and_nothing_written(settings, tmp_path, damage):
    """A damaged keyring.json gives KeyFileError (never a traceback) on init and open; no file changes."""
    init_keyring(settings)
    ring = tmp_path / "data" / KEYRING_FILE
    text = ring.read_text()
    ring.write_text(damage(text, json.loads(text)))
    before = snapshot(tmp_path)
    for attempt in (init_keyring, open_keyring):
        with pytest.raises(KeyFileError):
            attempt(settings)
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("field", ["salt", "log_n", "missing"])
def test_damaged_passphrase_parameters_are_refused(pass_settings, tmp_path, field):
    """Damaged scrypt parameters in keyring.json give KeyFileError, not a traceback."""
    init_keyring(pass_settings, passphrase=PASSPHRASE)
    ring = tmp_path / "data" / KEYRING_FILE
    state = json.loads(ring.read_text())
    if field == "missing":
        del state["passphrase"]["salt"]
    else:
        state["passphrase"][field] = {"salt": "!!not base64", "log_n": "many"}[field]
    ring.write_text(json.dumps(state))
    with pytest.raises(KeyFileError):
        open_keyring(pass_settings, passphrase=PASSPHRASE)
