"""Architecture rules: the core never reaches Flask, layers point downward, everything is documented."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import click
import pytest

import onprem_label
from onprem_label.cli import cli

PACKAGE_DIR = Path(onprem_label.__file__).resolve().parent
CORE = ("config", "logs", "db", "storage", "imaging", "workflow", "audit", "auth", "exchange", "dicomnet",
        "health", "backup")
REQUIRED_CORE = ("config", "db", "storage", "audit", "auth")
# Anything the web layer stands on; reaching one of these drags Flask into the core.
FORBIDDEN = ("flask", "flask_login", "flask_wtf", "werkzeug", "onprem_label.web", "onprem_label.app",
             "onprem_label.cli", "onprem_label.cli_accounts")
# DESIGN.md's "may import" column; config, clock and logs (stdlib-only leaves) are allowed everywhere.
LEAVES = {"config", "clock", "logs"}
MAY_IMPORT = {
    "config": set(),
    "clock": set(),
    "logs": set(),
    "db": set(),
    "storage": set(),
    # Ingest and every image read write audit events in their own transaction (DESIGN.md: every
    # state change and image read is audited), so imaging and workflow use audit.record.
    "imaging": {"storage", "db", "audit"},
    "workflow": {"db", "audit"},
    "audit": {"db", "storage"},
    "auth": {"db", "audit"},
    # Every export is an audit event (with its counts), like ingest and the workflow's changes.
    "exchange": {"db", "storage", "imaging", "audit"},
    # The DICOM receiver ingests through imaging and reads each project's dicom_callers (workflow.settings).
    "dicomnet": {"db", "storage", "imaging", "audit", "workflow"},
    # The doctor reads what the others keep (keys, blobs, schema, chain) and writes nothing.
    "health": {"db", "storage", "audit"},
    # A backup snapshots the database, copies the blob store, checks the audit chain and records
    # backup:create/verify/restore like every other state change.
    "backup": {"db", "storage", "audit"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_files() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = _module_files()


def _imports(name: str) -> set[str]:
    """Dotted names a module imports anywhere in its body (functions included), resolved."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from onprem_label.pkg import submodule` imports the submodule too.
            found.update(f"{module}.{alias.name}" for alias in node.names
                         if f"{module}.{alias.name}" in MODULES)
    return found


def _internal(name: str) -> set[str]:
    """The onprem_label modules `name` imports, each with the packages Python runs on the way."""
    result = set()
    for imported in _imports(name):
        parts = imported.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in MODULES and candidate != name:
                result.add(candidate)
    return result


def _reaches(start: str) -> dict[str, list[str]]:
    """Every module reachable from `start` through onprem_label imports, with one path to it."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        current = todo.pop()
        for nxt in sorted(_internal(current)):
            if nxt not in paths:
                paths[nxt] = paths[current] + [nxt]
                todo.append(nxt)
    return paths


def _forbidden_hits(module: str) -> list[str]:
    hits = []
    for reached, path in _reaches(module).items():
        for imported in _imports(reached) | {reached}:
            if any(imported == bad or imported.startswith(bad + ".") for bad in FORBIDDEN):
                hits.append(" -> ".join(path + ([imported] if imported != reached else [])))
    return sorted(set(hits))


def _core_modules() -> list[str]:
    names = []
    for package in CORE:
        prefix = f"onprem_label.{package}"
        names += [m for m in MODULES if m == prefix or m.startswith(prefix + ".")]
    return names


def _top(module: str) -> str:
    """The top-level part of the package a module belongs to ('onprem_label.auth.x' -> 'auth')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_required_core_packages_exist():
    """config, db, storage, audit and auth exist where the design puts them."""
    for package in REQUIRED_CORE:
        assert f"onprem_label.{package}" in MODULES, f"onprem_label/{package} is missing"


def test_import_scanner_sees_flask_where_it_is():
    """The scanner is live: it finds Flask reached from the app factory and the web layer."""
    assert _forbidden_hits("onprem_label.app")
    assert any(h.endswith("flask_login") for h in _forbidden_hits("onprem_label.web.login"))
    assert "onprem_label.auth.accounts" in _reaches("onprem_label.cli")


@pytest.mark.parametrize("module", _core_modules())
def test_core_module_never_reaches_flask(module):
    """No core module imports Flask, flask_login, werkzeug or the web layer, directly or transitively."""
    assert _forbidden_hits(module) == []


@pytest.mark.parametrize("module", _core_modules() + ["onprem_label.clock"])
def test_core_module_imports_only_downward(module):
    """A core package imports only what DESIGN.md's table allows (plus config and clock)."""
    own = _top(module)
    allowed = MAY_IMPORT[own] | LEAVES | {own, ""}  # "": the package root (__version__)
    upward = sorted(m for m in _internal(module) if _top(m) not in allowed)
    assert upward == [], f"{module} imports {upward}; {own} may import {sorted(MAY_IMPORT[own])}"


def test_importing_the_core_loads_no_flask():
    """At run time, importing every core module leaves flask, flask_login and werkzeug unloaded."""
    code = ("import importlib, sys\n"
            f"for m in {_core_modules()!r}:\n"
            "    importlib.import_module(m)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in "
            "('flask', 'flask_login', 'werkzeug') or n.startswith('onprem_label.web')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- documentation ---------------------------------------------------------------------------

def _undocumented(name: str) -> list[str]:
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    missing = [] if ast.get_docstring(tree) else [f"{name} (module)"]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name.startswith("_"):
                continue
            if not ast.get_docstring(node):
                missing.append(f"{name}.{node.name}")
    return missing


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_and_public_functions_have_docstrings(module):
    """Every module, and every public function and class in it, has a docstring."""
    assert _undocumented(module) == []


def _commands(group: click.Command, prefix: str = "onprem-label"):
    yield prefix, group
    if isinstance(group, click.Group):
        for sub_name, sub in sorted(group.commands.items()):
            yield from _commands(sub, f"{prefix} {sub_name}")


COMMANDS = list(_commands(cli))


def test_cli_has_the_contract_commands():
    """The commands the install scripts rely on exist."""
    names = {name for name, _ in COMMANDS}
    for expected in ("init", "serve", "db upgrade", "db current", "db check", "user create",
                     "user list", "user disable", "user unlock", "user reset-password",
                     "token create", "token revoke", "config show"):
        assert f"onprem-label {expected}" in names


@pytest.mark.parametrize("name, command", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_cli_command_has_help(name, command):
    """Every command and group has help text, and so does each of its options."""
    assert (command.help or "").strip(), f"{name} has no help text"
    for param in command.params:
        if isinstance(param, click.Option):
            assert (param.help or "").strip(), f"{name} {param.opts[0]} has no help text"
