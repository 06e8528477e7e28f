"""Settings: the example file matches the registry; precedence; clear errors; masking in `config show`."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from onprem_label.cli import cli
from onprem_label.config import (BY_NAME, CONFIG_FILE_NAME, ENV_PREFIX, REGISTRY, SECRET_ENV_VARS,
                                 SettingsError,
                                 load_settings)

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "onprem-label.toml.example"
HEADER_RE = re.compile(r"^# --- ([a-z_]+) -+$")
ASSIGNMENT_RE = re.compile(r"^# ?([a-z_][a-z0-9_]*) = (.+)$")
IN_FILE = [s for s in REGISTRY if s.name != "data_dir"]


@pytest.fixture(autouse=True)
def no_machine_env(monkeypatch):
    """The machine's own ONPREM_LABEL_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _example_lines() -> list[str]:
    return EXAMPLE.read_text(encoding="utf-8").splitlines()


def _blocks() -> dict[str, list[str]]:
    """The example's comment lines grouped by the `# --- name ---` header above them."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in _example_lines():
        header = HEADER_RE.match(line)
        if header:
            current = header.group(1)
            assert current not in blocks, f"setting {current} has two blocks in the example"
            blocks[current] = []
        elif current is not None:
            blocks[current].append(line)
    return blocks


def _uncommented() -> str:
    """The example with every commented-out `name = value` line switched on."""
    return "\n".join(m.group(1) + " = " + m.group(2)
                     for m in map(ASSIGNMENT_RE.match, _example_lines()) if m)


def _words(text: str) -> str:
    return " ".join(text.split())


# --- the example file ------------------------------------------------------------------------

def test_example_has_a_block_for_every_setting_but_data_dir():
    """Every registry setting except data_dir has its own block in the example, in registry order."""
    assert list(_blocks()) == [s.name for s in IN_FILE]


@pytest.mark.parametrize("setting", IN_FILE, ids=lambda s: s.name)
def test_example_block_documents_the_setting(setting):
    """A setting's block carries its help text, its env var and its default as `# name = value`."""
    block = _blocks().get(setting.name)
    assert block is not None, f"{setting.name} missing from {EXAMPLE.name}"
    comments = _words(" ".join(line.lstrip("#") for line in block))
    assert _words(setting.help) in comments, f"help text of {setting.name} not in its block"
    assert setting.env_var in comments
    assignments = [m for m in map(ASSIGNMENT_RE.match, block) if m]
    assert [m.group(1) for m in assignments] == [setting.name]
    value = tomllib.loads(f"v = {assignments[0].group(2)}")["v"]
    assert value == setting.default and type(value) is type(setting.default)


def test_example_names_only_registry_settings():
    """No assignment or ONPREM_LABEL_* variable in the example is unknown to the registry."""
    text = EXAMPLE.read_text(encoding="utf-8")
    assigned = {m.group(1) for m in map(ASSIGNMENT_RE.match, _example_lines()) if m}
    assert assigned <= set(BY_NAME) - {"data_dir"}, assigned - set(BY_NAME)
    env_vars = set(re.findall(ENV_PREFIX + r"[A-Z0-9_]+", text))
    allowed = {s.env_var for s in REGISTRY} | set(SECRET_ENV_VARS)
    assert env_vars <= allowed, env_vars - allowed


def test_example_is_toml_as_shipped_and_when_uncommented():
    """The file parses as TOML as shipped (empty) and with its defaults switched on (all of them)."""
    assert tomllib.loads(EXAMPLE.read_text(encoding="utf-8")) == {}
    values = tomllib.loads(_uncommented())
    assert values == {s.name: s.default for s in IN_FILE}


def test_uncommented_example_is_a_valid_config_file(tmp_path):
    """Used as <data_dir>/onprem-label.toml, the uncommented example loads and changes nothing."""
    (tmp_path / CONFIG_FILE_NAME).write_text(_uncommented(), encoding="utf-8")
    settings = load_settings({"data_dir": str(tmp_path)}, env={})
    assert settings.as_dict() == {**{s.name: s.default for s in IN_FILE}, "data_dir": str(tmp_path)}
    assert all(settings.sources[s.name] == str(tmp_path / CONFIG_FILE_NAME) for s in IN_FILE)


# --- precedence ------------------------------------------------------------------------------

def test_precedence_explicit_over_env_over_file_over_default(tmp_path):
    """explicit > env > <data_dir>/onprem-label.toml > default, and each value's source is kept."""
    config_file = tmp_path / CONFIG_FILE_NAME
    config_file.write_text("port = 9001\nthreads = 3\nlog_level = \"debug\"\n")
    env = {"ONPREM_LABEL_PORT": "9002", "ONPREM_LABEL_THREADS": "4"}
    s = load_settings({"data_dir": str(tmp_path), "port": 9003}, env=env)
    assert (s.port, s.sources["port"]) == (9003, "command line")
    assert (s.threads, s.sources["threads"]) == (4, "env ONPREM_LABEL_THREADS")
    assert (s.log_level, s.sources["log_level"]) == ("debug", str(config_file))
    assert (s.lockout_threshold, s.sources["lockout_threshold"]) == (5, "default")

    assert load_settings({"data_dir": str(tmp_path)}, env=env).port == 9002
    assert load_settings({"data_dir": str(tmp_path)}, env={}).port == 9001
    config_file.unlink()
    assert load_settings({"data_dir": str(tmp_path)}, env={}).port == 8080


def test_explicit_none_falls_through_to_env(tmp_path):
    """An option left unset on the command line (None) does not hide the env value."""
    s = load_settings({"data_dir": str(tmp_path), "port": None}, env={"ONPREM_LABEL_PORT": "9100"})
    assert (s.port, s.sources["port"]) == (9100, "env ONPREM_LABEL_PORT")


def test_data_dir_from_env_locates_the_config_file(tmp_path):
    """ONPREM_LABEL_DATA_DIR chooses the data directory, and so which config file is read."""
    (tmp_path / CONFIG_FILE_NAME).write_text("port = 9200\n")
    s = load_settings(env={"ONPREM_LABEL_DATA_DIR": str(tmp_path)})
    assert (s.data_dir, s.sources["data_dir"]) == (str(tmp_path), "env ONPREM_LABEL_DATA_DIR")
    assert s.port == 9200


@pytest.mark.parametrize("raw, expected", [
    ("true", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("off", False)])
def test_boolean_spellings_from_env(tmp_path, raw, expected):
    """Booleans from env accept the usual spellings."""
    env = {"ONPREM_LABEL_HTTPS": raw}
    if expected:
        env["ONPREM_LABEL_TRUSTED_PROXY"] = "127.0.0.1"  # https needs a proxy, and vice versa
    assert load_settings({"data_dir": str(tmp_path)}, env=env).https is expected


def test_list_from_env_splits_on_commas_and_spaces(tmp_path):
    """A list setting from env takes names separated by commas or spaces."""
    s = load_settings({"data_dir": str(tmp_path)},
                      env={"ONPREM_LABEL_REQUIRE_TOTP_ROLES": "admin, auditor manager"})
    assert s.require_totp_roles == ["admin", "auditor", "manager"]


# --- bad values ------------------------------------------------------------------------------

BAD_VALUES = [
    # (setting, value as env string, value in TOML, words of the reason)
    ("port", "eighty", '"eighty"', "expected an integer"),
    ("port", "70000", "70000", "from 1 to 65535"),
    ("threads", "0", "0", "from 1 to 256"),
    ("https", "maybe", '"maybe"', "expected true or false"),
    ("log_level", "loud", '"loud"', "expected one of debug, info, warning, error"),
    ("require_totp_roles", "root", '["root"]', "expected one of admin"),
    ("database_url", "mysql://db/x", '"mysql://db/x"', "expected a sqlite:/// or postgresql"),
]


def _assert_names(exc: SettingsError, name: str, source: str, reason: str) -> None:
    message = str(exc)
    assert "\n" not in message
    assert f"'{name}'" in message, message
    assert source in message, message
    assert reason in message, message


@pytest.mark.parametrize("name, env_raw, toml_raw, reason", BAD_VALUES, ids=lambda v: str(v)[:20])
def test_bad_value_from_env_names_setting_source_reason(tmp_path, name, env_raw, toml_raw, reason):
    """A bad env value raises one line naming the setting, the env var and the reason."""
    with pytest.raises(SettingsError) as caught:
        load_settings({"data_dir": str(tmp_path)}, env={BY_NAME[name].env_var: env_raw})
    _assert_names(caught.value, name, f"env {BY_NAME[name].env_var}", reason)


@pytest.mark.parametrize("name, env_raw, toml_raw, reason", BAD_VALUES, ids=lambda v: str(v)[:20])
def test_bad_value_from_file_names_setting_source_reason(tmp_path, name, env_raw, toml_raw, reason):
    """A bad value in the config file raises one line naming the setting, the file and the reason."""
    (tmp_path / CONFIG_FILE_NAME).write_text(f"{name} = {toml_raw}\n")
    with pytest.raises(SettingsError) as caught:
        load_settings({"data_dir": str(tmp_path)}, env={})
    _assert_names(caught.value, name, str(tmp_path / CONFIG_FILE_NAME), reason)


@pytest.mark.parametrize("name, env_raw, toml_raw, reason", BAD_VALUES, ids=lambda v: str(v)[:20])
def test_bad_explicit_value_names_setting_source_reason(tmp_path, name, env_raw, toml_raw, reason):
    """A bad explicit (command-line) value raises one line naming the setting and the reason."""
    with pytest.raises(SettingsError) as caught:
        load_settings({"data_dir": str(tmp_path), name: env_raw}, env={})
    _assert_names(caught.value, name, "command line", reason)


@pytest.mark.parametrize("toml_text, reason", [
    ("port = true\n", "expected an integer"),
    ("host = 8080\n", "expected a string"),
    ("https = \"yes please\"\n", "expected true or false"),
    ("require_totp_roles = [1, 2]\n", "expected a list of strings"),
])
def test_wrong_toml_types_are_rejected(tmp_path, toml_text, reason):
    """A TOML value of the wrong type is refused rather than coerced."""
    (tmp_path / CONFIG_FILE_NAME).write_text(toml_text)
    with pytest.raises(SettingsError, match=reason):
        load_settings({"data_dir": str(tmp_path)}, env={})


def test_unknown_key_in_file_is_rejected(tmp_path):
    """A misspelt name in the config file is an error naming it, not silently ignored."""
    (tmp_path / CONFIG_FILE_NAME).write_text("prot = 9000\n")
    with pytest.raises(SettingsError) as caught:
        load_settings({"data_dir": str(tmp_path)}, env={})
    _assert_names(caught.value, "prot", str(tmp_path / CONFIG_FILE_NAME), "unknown setting")


def test_data_dir_in_file_is_rejected(tmp_path):
    """data_dir cannot be set inside the data directory's own config file."""
    (tmp_path / CONFIG_FILE_NAME).write_text('data_dir = "/elsewhere"\n')
    with pytest.raises(SettingsError, match="'data_dir'.*cannot be set inside the data directory"):
        load_settings({"data_dir": str(tmp_path)}, env={})


def test_unknown_explicit_setting_is_rejected(tmp_path):
    """Code passing a name the registry does not know fails loudly."""
    with pytest.raises(SettingsError, match="'colour'.*unknown setting"):
        load_settings({"data_dir": str(tmp_path), "colour": "blue"}, env={})


def test_broken_toml_is_one_clear_error(tmp_path):
    """A config file that is not TOML is reported with its path, on one line."""
    (tmp_path / CONFIG_FILE_NAME).write_text("port = = 1\n")
    with pytest.raises(SettingsError) as caught:
        load_settings({"data_dir": str(tmp_path)}, env={})
    assert str(tmp_path / CONFIG_FILE_NAME) in str(caught.value)
    assert "not valid TOML" in str(caught.value) and "\n" not in str(caught.value)


def test_https_without_trusted_proxy_is_rejected(tmp_path):
    """https=true alone is refused: TLS must end at a configured, trusted proxy."""
    with pytest.raises(SettingsError, match="'https'.*needs trusted_proxy"):
        load_settings({"data_dir": str(tmp_path)}, env={"ONPREM_LABEL_HTTPS": "true"})


# --- config show -----------------------------------------------------------------------------

PG_URL = "postgresql+psycopg://labeler:S3cr3t-pw@db.example.internal:5432/onprem"


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_config_show_masks_password_in_database_url(tmp_path, as_json):
    """`config show` prints the database URL with its password masked, user and host kept."""
    args = ["--data-dir", str(tmp_path / "data"), "config", "show"] + (["--json"] if as_json else [])
    result = CliRunner().invoke(cli, args, env={"ONPREM_LABEL_DATABASE_URL": PG_URL})
    assert result.exit_code == 0, result.output
    assert "S3cr3t-pw" not in result.output
    assert "postgresql+psycopg://labeler:********@db.example.internal:5432/onprem" in result.output
    if as_json:
        shown = json.loads(result.output)
        assert set(shown) == set(BY_NAME)
        assert shown["database_url"]["source"] == "env ONPREM_LABEL_DATABASE_URL"
        assert shown["port"] == {"value": 8080, "source": "default"}


def test_config_show_lists_every_setting_with_its_source(tmp_path):
    """`config show` prints one line per setting, each with where the value came from."""
    data = tmp_path / "data"
    data.mkdir()
    (data / CONFIG_FILE_NAME).write_text("threads = 2\n")
    result = CliRunner().invoke(cli, ["--data-dir", str(data), "config", "show"],
                                env={"ONPREM_LABEL_PORT": "9300"})
    assert result.exit_code == 0, result.output
    lines = {line.split(" = ")[0]: line for line in result.output.splitlines()}
    assert list(lines) == [s.name for s in REGISTRY]
    assert lines["port"].startswith("port = 9300") and "env ONPREM_LABEL_PORT" in lines["port"]
    assert "threads = 2" in lines["threads"] and str(data / CONFIG_FILE_NAME) in lines["threads"]
    assert lines["data_dir"].endswith("# command line")


def test_config_show_does_not_create_the_data_dir(tmp_path):
    """Looking at settings writes nothing."""
    data = tmp_path / "data"
    result = CliRunner().invoke(cli, ["--data-dir", str(data), "config", "show"], env={})
    assert result.exit_code == 0 and not data.exists()


@pytest.mark.parametrize("value", ["*", "proxy.example.internal", "127.0.0.1,10.0.0.1", "10.0.0.0/8"])
def test_trusted_proxy_must_be_one_ip_address(tmp_path, value):
    """trusted_proxy accepts one literal IP: '*' would let any client forge X-Forwarded-For."""
    with pytest.raises(SettingsError, match="'trusted_proxy'.*IP address"):
        load_settings({"data_dir": str(tmp_path), "trusted_proxy": value, "https": True}, env={})


def test_trusted_proxy_needs_https(tmp_path):
    """A TLS proxy without https = true is refused: cookies would lose Secure and HSTS."""
    with pytest.raises(SettingsError, match="'trusted_proxy'.*needs https"):
        load_settings({"data_dir": str(tmp_path), "trusted_proxy": "127.0.0.1"}, env={})
    ok = load_settings({"data_dir": str(tmp_path), "trusted_proxy": "::1", "https": True}, env={})
    assert ok.trusted_proxy == "::1" and ok.https is True
