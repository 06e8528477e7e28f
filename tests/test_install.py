"""Tried as a new user would: build the wheel, install it in a fresh venv, init, serve, sign in.

Nothing here imports the source tree into the server: the wheel is built from a copy of the
tree, installed into a new virtualenv, and every command runs from an empty temporary
directory with the repository off `sys.path`. The only network use is pip fetching the
dependencies from the configured index (its cache is reused); the server listens on loopback.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
from install_helpers import (BUILD_TIMEOUT, COMMAND_TIMEOUT, INSTALL_TIMEOUT, LOOPBACK, NOT_SOURCE, REPO,
                             Browser, explain, free_port, init_admin, run, sign_in_and_change_password,
                             start_server, stop, user_env, wait_healthy)

pytestmark = pytest.mark.slow


def _source_files(src: Path) -> set[str]:
    """The paths, inside the wheel, of every file the package and its migrations consist of."""
    expected = set()
    for root, target in ((src / "onprem_label", "onprem_label"),
                         (src / "migrations", "onprem_label/migrations")):
        for path in root.rglob("*"):
            rel = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") or part == "__pycache__"
                                          for part in rel.parts):
                expected.add(f"{target}/{rel.as_posix()}")
    return expected


# --- fixtures: one wheel and one fresh venv for the whole module ------------------------------

@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """A copy of the source tree as a developer has it, minus local state and build output."""
    src = tmp_path_factory.mktemp("source") / "onprem-label"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    return src


@pytest.fixture(scope="module")
def wheel(source_copy, tmp_path_factory) -> Path:
    """The one wheel `pip wheel .` builds from the source tree (no build isolation: works offline)."""
    out = tmp_path_factory.mktemp("wheelhouse")
    result = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                   "--no-input", ".", "-w", out], cwd=source_copy, timeout=BUILD_TIMEOUT)
    assert result.returncode == 0, "building the wheel failed (dev extra installed?)\n" + explain(result)
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, f"expected exactly one wheel, got {[w.name for w in wheels]}"
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A new virtualenv with only the wheel (and its dependencies from the index) installed."""
    home = tmp_path_factory.mktemp("newuser")
    venv = home / "venv"
    result = run([sys.executable, "-m", "venv", venv], cwd=home, timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, "python -m venv failed\n" + explain(result)
    result = run([venv / "bin" / "python", "-m", "pip", "install", "--no-input", wheel],
                  cwd=home, env=user_env(venv), timeout=INSTALL_TIMEOUT)
    assert result.returncode == 0, "pip install of the wheel failed\n" + explain(result)
    return venv


@pytest.fixture
def workdir(tmp_path) -> Path:
    """An empty current directory for the operator's commands, far from the repository."""
    path = tmp_path / "cwd"
    path.mkdir()
    return path


# --- the wheel ------------------------------------------------------------------------------

def test_wheel_holds_package_migrations_templates_static_and_password_list(wheel, source_copy):
    """One wheel carries every package file: migrations, templates, static files, password list."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
        assert len(dist_info) == 1, dist_info
        entry_points = archive.read(f"{dist_info.pop()}/entry_points.txt").decode()
    for required in ("onprem_label/__init__.py", "onprem_label/cli.py",
                     "onprem_label/migrations/env.py", "onprem_label/migrations/script.py.mako",
                     "onprem_label/migrations/versions/0001_initial_schema.py",
                     "onprem_label/web/templates/base.html", "onprem_label/web/templates/login.html",
                     "onprem_label/web/templates/password.html",
                     "onprem_label/web/static/style.css",
                     "onprem_label/auth/data/common-passwords.txt.gz"):
        assert required in names, f"{required} missing from {wheel.name}"
    missing = sorted(_source_files(source_copy) - names)
    assert not missing, (f"source files missing from {wheel.name} "
                         f"(pyproject packages / package-data?): {missing}")
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"onprem_label"}, top
    assert re.search(r"^onprem-label\s*=\s*onprem_label\.cli:main$", entry_points, re.M), entry_points


# --- the installed package ------------------------------------------------------------------

def test_installed_package_runs_from_the_venv_not_the_source_tree(venv, workdir):
    """`onprem-label --help` works, and the code, migrations and password list load from site-packages."""
    env = user_env(venv)
    result = run([venv / "bin" / "onprem-label", "--help"], cwd=workdir, env=env)
    assert result.returncode == 0, explain(result)
    for command in ("init", "serve", "db", "user", "token", "config"):
        assert re.search(rf"^\s+{command}\b", result.stdout, re.M), \
            f"--help lacks {command}:\n{result.stdout}"
    probe = ("import json, onprem_label, sqlalchemy\n"
             "from importlib.resources import files\n"
             "from onprem_label.db import migrate\n"
             "from onprem_label.auth import passwords\n"
             "engine = sqlalchemy.create_engine('sqlite://')\n"
             "print(json.dumps({'package': onprem_label.__file__,\n"
             "  'migrations': str(files('onprem_label.migrations')),\n"
             "  'head': migrate.head_revision(engine),\n"
             "  'common': len(passwords.common_passwords())}))\n")
    result = run([venv / "bin" / "python", "-c", probe], cwd=workdir, env=env)
    assert result.returncode == 0, explain(result)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    site = (venv / "lib").resolve()
    for key in ("package", "migrations"):
        path = Path(found[key]).resolve()
        assert site in path.parents, f"{key} loaded from {path}, not from the venv"
        assert REPO not in path.parents, f"{key} loaded from the source tree: {path}"
    assert found["head"], "no migration head found in the installed package"
    assert found["common"] >= 10_000, "the shipped common-password list did not load"


# --- first run: init, serve, sign in, forced password change ----------------------------------

def test_new_user_inits_serves_signs_in_and_must_change_password(venv, workdir):
    """init's one-time password signs in over real HTTP, must be changed, then /admin/users opens."""
    env = user_env(venv)
    exe = venv / "bin" / "onprem-label"
    data = workdir / "data"

    username, password = init_admin(exe, data, cwd=workdir, env=env)
    assert (data / "onprem-label.db").is_file()
    assert data.with_name(data.name + ".key").is_file()

    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    log = workdir / "serve.log"
    server = start_server([exe, "--data-dir", data, "serve", "--host", LOOPBACK, "--port", port],
                          cwd=workdir, env=env, log=log)
    try:
        health = wait_healthy(base, server, log)
        assert health["status"] == 200 and health["body"]["status"] == "ok", health

        second = run([exe, "--data-dir", data, "serve", "--host", LOOPBACK, "--port", port],
                     cwd=workdir, env=env)
        assert second.returncode != 0, explain(second)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and str(port) in lines[0], explain(second)
        assert server.poll() is None, "the first server died when a second one tried its port"

        sign_in_and_change_password(Browser(base, server, log), username, password)
    finally:
        stop(server)

    again = run([exe, "--data-dir", data, "init"], cwd=workdir, env=env)
    assert again.returncode == 0, explain(again)
    assert "password" not in again.stdout.lower(), explain(again)
    assert "already initialised" in again.stdout, explain(again)
