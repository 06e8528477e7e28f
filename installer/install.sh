#!/usr/bin/env bash
# Install onprem-label @VERSION@ from this offline bundle (CPython @PYTHON_VERSION@, Linux x86_64).
#
# 1. checks every file of the bundle against SHA256SUMS before it creates anything, and stops on
#    a changed, missing or unexpected file;
# 2. makes a virtualenv (or upgrades the one given) and installs the bundle's wheels into it with
#    `pip --no-index`: nothing is fetched from a network;
# 3. as root, unless --venv-only: creates the onprem-label system user, the data directory
#    (0700), the master key beside it, /etc/onprem-label/onprem-label.toml from the example, the
#    systemd unit and the /usr/local/sbin/onprem-label admin wrapper. It starts nothing.
# See INSTALL.md.
set -euo pipefail

VERSION="@VERSION@"
PYTHON_VERSION="@PYTHON_VERSION@"
SERVICE_USER="onprem-label"
ETC_DIR="/etc/onprem-label"
UNIT_PATH="/etc/systemd/system/onprem-label.service"
WRAPPER_PATH="/usr/local/sbin/onprem-label"

usage() {
    cat <<EOF
Usage: install.sh [OPTIONS]

Install onprem-label $VERSION from this bundle (CPython $PYTHON_VERSION, Linux x86_64).

  --venv DIR        virtualenv to create or upgrade (default /opt/onprem-label/venv)
  --python PROGRAM  the CPython $PYTHON_VERSION to build it with (default python$PYTHON_VERSION)
  --postgres        also install the PostgreSQL driver (psycopg)
  --data-dir DIR    data directory of the service (default /var/lib/onprem-label)
  --venv-only       only verify and install into the venv: no user, directories, config or
                    unit (needs no root)
  --verify-only     only check the bundle's files against SHA256SUMS
  --unit-out FILE   also write the service unit for this venv and data directory to FILE
  -h, --help        this text
EOF
}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

bundle_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
venv="/opt/onprem-label/venv"
python=""
extras=""
data_dir="/var/lib/onprem-label"
venv_only=0
verify_only=0
unit_out=""

need_value() { [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ "$#" -gt 0 ]; do
    case "$1" in
        --venv) need_value "$@"; venv="$2"; shift 2 ;;
        --python) need_value "$@"; python="$2"; shift 2 ;;
        --data-dir) need_value "$@"; data_dir="$2"; shift 2 ;;
        --unit-out) need_value "$@"; unit_out="$2"; shift 2 ;;
        --postgres) extras="[postgres]"; shift ;;
        --venv-only) venv_only=1; shift ;;
        --verify-only) verify_only=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

absolute() {
    # The absolute form of a path that may not exist yet (its parent need not exist either).
    case "$1" in
        /*) printf '%s' "$1" ;;
        *) printf '%s/%s' "$(pwd -P)" "$1" ;;
    esac
}

# --- 1. the bundle's files against SHA256SUMS (nothing is created before this passes) ----------
verify_bundle() {
    local sums="$bundle_dir/SHA256SUMS" listed present bad extra line
    [ -f "$sums" ] || die "SHA256SUMS is missing from $bundle_dir: the bundle is incomplete"
    command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found (install coreutils)"
    # Every line is '<64 hex digits>  <relative path>' with no '..' and no absolute path.
    while IFS= read -r line || [ -n "$line" ]; do
        [[ "$line" =~ ^[0-9a-f]{64}\ \ [^/].*$ ]] || die "SHA256SUMS has a malformed line: '$line'"
        case "/${line:66}/" in
            */../*|*/./*|*//*) die "SHA256SUMS names a path outside the bundle: '${line:66}'" ;;
        esac
    done < "$sums"
    [ -s "$sums" ] || die "SHA256SUMS is empty"
    if ! bad="$(cd -- "$bundle_dir" && LC_ALL=C sha256sum --check --strict --quiet SHA256SUMS 2>&1)"; then
        printf '%s\n' "$bad" | sed -e 's/^/  /' >&2
        die "the bundle does not match SHA256SUMS (changed or missing files above); get a fresh copy"
    fi
    listed="$(sed -e 's/^[0-9a-f]\{64\}  //' "$sums" | LC_ALL=C sort)"
    present="$(cd -- "$bundle_dir" && find . -mindepth 1 ! -type d ! -path ./SHA256SUMS -print \
        | sed -e 's|^\./||' | LC_ALL=C sort)"
    extra="$(LC_ALL=C comm -13 <(printf '%s\n' "$listed") <(printf '%s\n' "$present"))"
    if [ -n "$extra" ]; then
        printf '%s\n' "$extra" | sed -e 's/^/  unexpected: /' >&2
        die "the bundle holds files SHA256SUMS does not list (above); get a fresh copy"
    fi
    say "bundle verified: $(printf '%s\n' "$listed" | wc -l) files match SHA256SUMS"
    say "SHA256SUMS itself: $(sha256sum "$sums" | cut -d' ' -f1) (compare with the value published with the bundle)"
}

# --- 2. the venv -----------------------------------------------------------------------------
check_python() {
    if [ -z "$python" ]; then
        python="$(command -v "python$PYTHON_VERSION" || true)"
        [ -n "$python" ] || die "python$PYTHON_VERSION not found; install CPython $PYTHON_VERSION or pass --python"
    fi
    local found
    found="$("$python" -c 'import platform, sys; print("%s %d.%d %s" % (platform.python_implementation(), sys.version_info[0], sys.version_info[1], platform.machine()))' 2>/dev/null)" \
        || die "cannot run '$python'"
    [ "$found" = "CPython $PYTHON_VERSION x86_64" ] \
        || die "this bundle is for CPython $PYTHON_VERSION on x86_64; '$python' is $found"
    "$python" -c 'import ensurepip, venv' 2>/dev/null \
        || die "'$python' cannot make virtualenvs (Debian/Ubuntu: apt install python$PYTHON_VERSION-venv)"
}

install_venv() {
    # The code is no secret, and the service user must read it whatever root's umask is.
    umask 022
    if [ -e "$venv" ]; then
        [ -x "$venv/bin/python" ] || die "$venv exists and is not a virtualenv; choose another --venv"
        local inside
        inside="$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
            || die "the virtualenv $venv is broken (its python does not run); remove it or choose another --venv"
        [ "$inside" = "$PYTHON_VERSION" ] \
            || die "the virtualenv $venv is Python $inside, this bundle is for $PYTHON_VERSION; use a new --venv"
        say "upgrading the virtualenv $venv"
    else
        say "creating the virtualenv $venv"
        "$python" -m venv "$venv" || die "python -m venv $venv failed"
    fi
    # No pip configuration, index or cache of this machine may add to what the bundle holds.
    local var
    for var in $(compgen -e); do
        case "$var" in PIP_*) unset "$var" ;; esac
    done
    export PIP_CONFIG_FILE=/dev/null PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
    "$venv/bin/python" -m pip install --no-index --find-links "$bundle_dir/wheels" --no-cache-dir \
        --upgrade --upgrade-strategy eager "onprem-label${extras}==$VERSION" \
        || die "pip install from the bundle into $venv failed (see above)"
    # setuptools comes with ensurepip (CPython 3.11), not from the bundle; nothing run needs it.
    if [ -z "$("$venv/bin/python" -m pip show setuptools 2>/dev/null | sed -n 's/^Required-by: *//p')" ] \
        && "$venv/bin/python" -m pip show setuptools >/dev/null 2>&1; then
        "$venv/bin/python" -m pip uninstall --yes --quiet setuptools
    fi
    link_duplicates
    "$venv/bin/python" -m pip check >/dev/null || die "the installed packages are inconsistent ('$venv/bin/python -m pip check')"
    say "installed $("$venv/bin/onprem-label" --version) into $venv"
}

link_duplicates() {
    # Wheels cannot hold symlinks, so python-gdcm ships each shared library three times
    # (libX.so, libX.so.3.2, libX.so.3.2.6): identical files become hard links of one, ~20 MB
    # less on disk with the same names and bytes.
    "$venv/bin/python" - "$venv" <<'PYTHON'
import hashlib, os, sys
groups = {}
for root, _dirs, files in os.walk(os.path.join(sys.argv[1], "lib")):
    for name in files:
        path = os.path.join(root, name)
        st = os.lstat(path)
        if os.path.isfile(path) and not os.path.islink(path) and st.st_size >= 65536:
            groups.setdefault((st.st_size, st.st_dev), []).append(path)
saved = linked = 0
for (size, _dev), paths in groups.items():
    if len(paths) < 2:
        continue
    by_digest = {}
    for path in sorted(paths):
        with open(path, "rb") as fh:
            by_digest.setdefault(hashlib.file_digest(fh, "sha256").hexdigest(), []).append(path)
    for first, *same in by_digest.values():
        for path in same:
            if os.lstat(path).st_ino != os.lstat(first).st_ino:
                os.link(first, path + ".link-tmp")
                os.replace(path + ".link-tmp", path)
                saved, linked = saved + size, linked + 1
if linked:
    print(f"install.sh: hard-linked {linked} duplicate files ({saved / 1e6:.1f} MB)")
PYTHON
}

render_unit() {
    # The shipped unit with this install's venv and data directory in place of the defaults.
    sed -e "s|/opt/onprem-label/venv|$venv|g" -e "s|/var/lib/onprem-label|$data_dir|g" \
        "$bundle_dir/systemd/onprem-label.service"
}

# --- 3. the service (root only) ---------------------------------------------------------------
install_service() {
    local key="$data_dir.key" share
    share="$(dirname -- "$venv")/share"
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --user-group --home-dir "$data_dir" --no-create-home \
            --shell /usr/sbin/nologin --comment "onprem-label server" "$SERVICE_USER"
        say "created the system user $SERVICE_USER"
    fi
    install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$data_dir"
    chmod 0700 "$data_dir"
    install -d -m 0750 -o root -g "$SERVICE_USER" "$ETC_DIR"
    if [ ! -e "$ETC_DIR/onprem-label.toml" ]; then
        install -m 0640 -o root -g "$SERVICE_USER" "$bundle_dir/config/onprem-label.toml.example" \
            "$ETC_DIR/onprem-label.toml"
        say "wrote $ETC_DIR/onprem-label.toml (every setting commented out: the defaults)"
    fi
    # The server reads <data_dir>/onprem-label.toml: a symlink keeps the settings in /etc.
    if [ ! -e "$data_dir/onprem-label.toml" ] && [ ! -L "$data_dir/onprem-label.toml" ]; then
        ln -s "$ETC_DIR/onprem-label.toml" "$data_dir/onprem-label.toml"
    fi
    if [ ! -e "$key" ]; then
        # The project's own key writer: 32 random bytes, mode 0600, never over an existing key.
        "$venv/bin/python" -c 'import sys; from pathlib import Path; from onprem_label.storage.keys import create_key_file; sys.exit(0 if create_key_file(Path(sys.argv[1])) else 1)' "$key" \
            || die "could not create the master key $key"
        chown "$SERVICE_USER:$SERVICE_USER" "$key"
        say "created the master key $key (mode 0600): copy it off this machine now (INSTALL.md)"
    fi
    install -d -m 0755 "$share"
    install -m 0644 "$bundle_dir/INSTALL.md" "$bundle_dir/config/"*.example "$share/"
    render_unit > "$UNIT_PATH.tmp"
    chmod 0644 "$UNIT_PATH.tmp"
    mv -f -- "$UNIT_PATH.tmp" "$UNIT_PATH"
    say "installed $UNIT_PATH (not enabled, not started)"
    cat > "$WRAPPER_PATH.tmp" <<EOF
#!/bin/sh
# onprem-label as its service user on its data directory (written by install.sh); the umask
# is the unit's, so what init, restore or key rotate write is the service user's alone.
umask 077
cd / && exec runuser -u $SERVICE_USER -- env ONPREM_LABEL_DATA_DIR=$data_dir $venv/bin/onprem-label "\$@"
EOF
    chmod 0755 "$WRAPPER_PATH.tmp"
    mv -f -- "$WRAPPER_PATH.tmp" "$WRAPPER_PATH"
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
    say "next: 'onprem-label init' (as root, through $WRAPPER_PATH), then 'systemctl enable --now onprem-label'"
}

# --- main ------------------------------------------------------------------------------------
venv="$(absolute "$venv")"
data_dir="$(absolute "$data_dir")"
if [ "$verify_only" -eq 0 ] && [ "$venv_only" -eq 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "run as root to install the service, or pass --venv-only"
fi
if [ "$verify_only" -eq 0 ] && { [ "$venv_only" -eq 0 ] || [ -n "$unit_out" ]; }; then
    # The paths go into a unit file, a sed expression and a shell script: keep them plain.
    for path in "$venv" "$data_dir"; do
        [[ "$path" =~ ^/[A-Za-z0-9._/-]+$ ]] || die "'$path': use a path of letters, digits and ._/- only"
    done
fi
case "$venv/" in
    "$bundle_dir"/*) die "the venv must not be inside the bundle ($bundle_dir)" ;;
esac

verify_bundle
[ "$verify_only" -eq 1 ] && exit 0
check_python
install_venv
if [ -n "$unit_out" ]; then
    render_unit > "$unit_out"
    say "wrote the service unit to $unit_out"
fi
[ "$venv_only" -eq 1 ] && exit 0
install_service
