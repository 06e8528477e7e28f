"""Programs the tests drive from Debian's packages (Chromium, dcmtk, Orthanc), installed when missing.

The suite installs what it needs itself (as root, with apt), so a clean machine and CI run the same
tests; under CI a program that cannot be installed fails the run instead of skipping its tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def under_ci() -> bool:
    """True when the suite runs under CI (`CI=true`), where nothing may be skipped for lack of a tool."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def ensure_program(path: str, package: str) -> str:
    """`path` (an absolute path to a program), installing Debian's `package` first when it is missing."""
    if os.path.exists(path):
        return path
    apt = shutil.which("apt-get")
    if apt and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # Packages whose install scripts would start a system service (orthanc) must not: the tests
        # start their own copy on their own loopback ports.
        install = [apt, "install", "-y", "--no-install-recommends", package]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run([apt, "update"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
    if os.path.exists(path):
        return path
    message = f"Debian's {package} is not installed ({path} is missing) and could not be installed here"
    if under_ci():
        pytest.fail(message + " (CI runs every test)")
    pytest.skip(message)
