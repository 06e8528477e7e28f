#!/usr/bin/env bash
# Install onprem-label @VERSION@ from this offline bundle (CPython @PYTHON_VERSION@, Linux x86_64).
#
# 1. checks every file of the bundle against SHA256SUMS before it creates anything, and stops on
#    a changed, missing or unexpected file;
# 2. makes a virtualenv (or upgrades the one given) and installs the bundle's wheels into it with
#    `pip --no-index`: nothing is fetched from a network;
# 3. as root, unless --venv-only: creates the onprem-label system user, the data directory
#    (0700), the master key in a folder of its own beside it, /var/log/onprem-label,
#    /etc/onprem-label/onprem-label.toml from the example, the systemd unit and the
#    /usr/local/sbin/onprem-label admin wrapper. It starts nothing.
# As root it works from a root-only copy of the bundle, so nobody can swap a checked file.
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
source_dir="$bundle_dir"
copy_root=""
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

# Every relative option is made absolute here, then the rest runs in /: no Python started below
# (as root, too) may import a module from whatever folder the admin happened to be in.
venv="$(absolute "$venv")"
data_dir="$(absolute "$data_dir")"
[ -z "$unit_out" ] || unit_out="$(absolute "$unit_out")"
case "$python" in
    */*) python="$(absolute "$python")" ;;
esac
cd /
# Nothing from the caller's environment may steer the Pythons run below.
for var in $(compgen -e); do
    case "$var" in PYTHON*) unset "$var" ;; esac
done

# --- 1. the bundle's files against SHA256SUMS (nothing is created before this passes) ----------
verify_bundle() {
    local sums="$bundle_dir/SHA256SUMS" listed present bad extra line
    [ -f "$sums" ] || die "SHA256SUMS is missing from $bundle_dir: the bundle is incomplete"
    command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found (install coreutils)"
    # Every line is '<64 hex digits>  <relative path>' with no '..' and no absolute path.
    while IFS= read -r line || [ -n "$line" ]; do
        [[ "$line" =~ ^[0-9a-f]{64}\ \ [A-Za-z0-9._+-][A-Za-z0-9._+/-]*$ ]] \
            || die "SHA256SUMS has a malformed line: '$line'"
        case "/${line:66}/" in
            */../*|*/./*|*//*) die "SHA256SUMS names a path outside the bundle: '${line:66}'" ;;
        esac
    done < "$sums"
    [ -s "$sums" ] || die "SHA256SUMS is empty"
    # Only plain names: a newline or other odd byte could split or hide an entry in the lists below.
    # And only regular files and folders: sha256sum follows a symlink, so one would pass the check
    # while pointing wherever its owner likes.
    while IFS= read -r -d '' line; do
        line="${line#./}"
        [[ "$line" =~ ^[A-Za-z0-9._+/-]+$ ]] || die "the bundle holds a file with an unexpected name: '$line'"
        if [ -L "$bundle_dir/$line" ]; then
            die "the bundle holds a symlink, '$line'; get a fresh copy"
        elif [ ! -f "$bundle_dir/$line" ] && [ ! -d "$bundle_dir/$line" ]; then
            die "the bundle holds '$line', which is neither a file nor a folder; get a fresh copy"
        fi
    done < <(cd -- "$bundle_dir" && find . -mindepth 1 -print0)
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
    say "SHA256SUMS itself: $(sha256sum "$sums" | cut -d' ' -f1) (the value in <archive>.SHA256SUMS.sha256 published with the bundle)"
}

copy_bundle() {
    # As root, check and install from a copy only root can touch: a bundle unpacked by another
    # user stays theirs, and they could swap a wheel or the unit between the check and its use.
    # cp -R copies symlinks and special files as what they are, so verify_bundle still sees them.
    copy_root="$(umask 077 && mktemp -d /tmp/onprem-label-bundle.XXXXXXXX)" \
        || die "could not make a folder for the bundle's copy in /tmp"
    trap 'rm -rf -- "$copy_root"' EXIT
    (umask 077 && cp -R --no-preserve=all -- "$source_dir" "$copy_root/bundle") \
        || die "could not copy the bundle to $copy_root"
    bundle_dir="$copy_root/bundle"
}

check_root_path() {
    # Root runs the venv's python: nobody else may be able to change it or any folder above it.
    # A root-owned sticky folder (/tmp) counts: others cannot rename or remove what is in it.
    local part="" name owner mode type
    local -a names
    IFS=/ read -r -a names <<< "$1"
    for name in "${names[@]}"; do
        [ -n "$name" ] || continue
        part="$part/$name"
        [ -e "$part" ] || [ -L "$part" ] || break
        read -r owner mode type <<< "$(stat -c '%u %a %F' -- "$part")"
        [ "$owner" = 0 ] || die "$part (on the way to the venv) is not owned by root; choose another --venv"
        [ "$type" = "symbolic link" ] && continue  # its target is walked as well (see main)
        if (( (8#$mode & 8#022) != 0 && (8#$mode & 8#1000) == 0 )); then
            die "$part (on the way to the venv) is writable by others than root; choose another --venv"
        fi
    done
}

# --- 2. the venv -----------------------------------------------------------------------------
check_python() {
    if [ -z "$python" ]; then
        python="$(command -v "python$PYTHON_VERSION" || true)"
        [ -n "$python" ] || die "python$PYTHON_VERSION not found; install CPython $PYTHON_VERSION or pass --python"
    fi
    local found
    found="$("$python" -I -c 'import platform, sys; print("%s %d.%d %s" % (platform.python_implementation(), sys.version_info[0], sys.version_info[1], platform.machine()))' 2>/dev/null)" \
        || die "cannot run '$python'"
    [ "$found" = "CPython $PYTHON_VERSION x86_64" ] \
        || die "this bundle is for CPython $PYTHON_VERSION on x86_64; '$python' is $found"
    "$python" -I -c 'import ensurepip, venv' 2>/dev/null \
        || die "'$python' cannot make virtualenvs (Debian/Ubuntu: apt install python$PYTHON_VERSION-venv)"
}

install_venv() {
    # The code is no secret, and the service user must read it whatever root's umask is.
    umask 022
    if [ -e "$venv" ]; then
        [ -x "$venv/bin/python" ] || die "$venv exists and is not a virtualenv; choose another --venv"
        local inside
        inside="$("$venv/bin/python" -I -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
            || die "the virtualenv $venv is broken (its python does not run); remove it or choose another --venv"
        [ "$inside" = "$PYTHON_VERSION" ] \
            || die "the virtualenv $venv is Python $inside, this bundle is for $PYTHON_VERSION; use a new --venv"
        say "upgrading the virtualenv $venv"
    else
        say "creating the virtualenv $venv"
        "$python" -I -m venv "$venv" || die "python -m venv $venv failed"
    fi
    # No pip configuration, index or cache of this machine may add to what the bundle holds.
    local var
    for var in $(compgen -e); do
        case "$var" in PIP_*) unset "$var" ;; esac
    done
    export PIP_CONFIG_FILE=/dev/null PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
    "$venv/bin/python" -I -m pip install --no-index --find-links "$bundle_dir/wheels" --no-cache-dir \
        --upgrade --upgrade-strategy eager "onprem-label${extras}==$VERSION" \
        || die "pip install from the bundle into $venv failed (see above)"
    # setuptools comes with ensurepip (CPython 3.11), not from the bundle; nothing run needs it.
    if [ -z "$("$venv/bin/python" -I -m pip show setuptools 2>/dev/null | sed -n 's/^Required-by: *//p')" ] \
        && "$venv/bin/python" -I -m pip show setuptools >/dev/null 2>&1; then
        "$venv/bin/python" -I -m pip uninstall --yes --quiet setuptools
    fi
    link_duplicates
    "$venv/bin/python" -I -m pip check >/dev/null || die "the installed packages are inconsistent ('$venv/bin/python -m pip check')"
    say "installed $("$venv/bin/onprem-label" --version) into $venv"
}

link_duplicates() {
    # Wheels cannot hold symlinks, so python-gdcm ships each shared library three times
    # (libX.so, libX.so.3.2, libX.so.3.2.6): identical files become hard links of one, ~20 MB
    # less on disk with the same names and bytes.
    "$venv/bin/python" -I - "$venv" <<'PYTHON'
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
    local share legacy_key="$data_dir.key" config="$ETC_DIR/onprem-label.toml"
    share="$(dirname -- "$venv")/share"
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --user-group --home-dir "$data_dir" --no-create-home \
            --shell /usr/sbin/nologin --comment "onprem-label server" "$SERVICE_USER"
        say "created the system user $SERVICE_USER"
    fi
    install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$data_dir"
    chmod 0700 "$data_dir"
    # The key's own folder: `key rotate` (through the wrapper, as the service user) writes the new
    # key and keeps the old one beside it, which it could not do in root's /var/lib.
    install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$key_dir"
    chmod 0700 "$key_dir"
    # Log files (log_file = "/var/log/onprem-label/{command}.log") of the wrapper's commands; the
    # unit's LogsDirectory= makes the same folder for the service.
    install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" /var/log/onprem-label
    install -d -m 0750 -o root -g "$SERVICE_USER" "$ETC_DIR"
    if [ ! -e "$config" ]; then
        if [ -e "$legacy_key" ]; then
            # An earlier install's key beside the data directory: the default key_file finds it.
            install -m 0640 -o root -g "$SERVICE_USER" "$bundle_dir/config/onprem-label.toml.example" "$config"
        else
            sed -e "s|^# key_file = \"\"\$|key_file = \"$key\"|" "$bundle_dir/config/onprem-label.toml.example" \
                > "$config.tmp"
            grep -qx "key_file = \"$key\"" "$config.tmp" || die "the example settings have no key_file line to set"
            chown "root:$SERVICE_USER" "$config.tmp"
            chmod 0640 "$config.tmp"
            mv -f -- "$config.tmp" "$config"
        fi
        say "wrote $config (every setting but key_file commented out: the defaults)"
    fi
    # The server reads <data_dir>/onprem-label.toml: a symlink keeps the settings in /etc.
    if [ ! -e "$data_dir/onprem-label.toml" ] && [ ! -L "$data_dir/onprem-label.toml" ]; then
        ln -s "$config" "$data_dir/onprem-label.toml"
    fi
    if grep -qx "key_file = \"$key\"" "$config"; then
        if [ ! -e "$key" ] && [ ! -L "$key" ]; then
            # The project's own key writer (32 random bytes, mode 0600, never over an existing
            # key), run as the service user: root writes nothing into that user's folder.
            (umask 077 && runuser -u "$SERVICE_USER" -- "$venv/bin/python" -I -c 'import sys; from pathlib import Path; from onprem_label.storage.keys import create_key_file; sys.exit(0 if create_key_file(Path(sys.argv[1])) else 1)' "$key") \
                || die "could not create the master key $key"
            say "created the master key $key (mode 0600): copy it off this machine now (INSTALL.md)"
        fi
    elif [ -e "$legacy_key" ]; then
        say "note: the master key is $legacy_key, where 'onprem-label key rotate' cannot write; move it to $key (INSTALL.md, section 8)"
    fi
    install -d -m 0755 "$share"
    install -m 0644 "$bundle_dir/INSTALL.md" "$bundle_dir/config/"*.example "$share/"
    render_unit > "$UNIT_PATH.tmp"
    chmod 0644 "$UNIT_PATH.tmp"
    mv -f -- "$UNIT_PATH.tmp" "$UNIT_PATH"
    say "installed $UNIT_PATH (not enabled, not started)"
    cat > "$WRAPPER_PATH.tmp" <<EOF
#!/bin/bash
# onprem-label as its service user on its data directory (written by install.sh); the umask
# is the unit's, so what init, restore or key rotate write is the service user's alone.
umask 077
cd / || exit 1
# The command runs in a session of its own, without root's terminal as its controlling one, so it
# cannot push keystrokes into root's shell (TIOCSTI). Its stdin and stdout stay root's (prompts
# and pipes work as before); Ctrl+C and a kill of this script reach it through the traps.
trap 'kill -INT -- "-\$child" 2>/dev/null' INT
trap 'kill -TERM -- "-\$child" 2>/dev/null' TERM HUP
# A command started with & ignores SIGINT and SIGQUIT and reads /dev/null unless told otherwise.
( trap - INT QUIT; exec setsid runuser -u $SERVICE_USER -- env ONPREM_LABEL_DATA_DIR=$data_dir $venv/bin/onprem-label "\$@" ) 0<&0 &
child=\$!
wait "\$child"; status=\$?
while kill -0 "\$child" 2>/dev/null; do wait "\$child"; status=\$?; done
exit "\$status"
EOF
    chmod 0755 "$WRAPPER_PATH.tmp"
    mv -f -- "$WRAPPER_PATH.tmp" "$WRAPPER_PATH"
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
    say "next: 'onprem-label init' (as root, through $WRAPPER_PATH), then 'systemctl enable --now onprem-label'"
}

# --- main ------------------------------------------------------------------------------------
# The master key's folder, beside the data directory and outside it.
key_dir="$data_dir-key"
key="$key_dir/$(basename -- "$data_dir").key"

main() {
    # In a function: bash has read all of it before it runs, so a change to this file on disk
    # while it runs changes nothing.
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
        "$source_dir"/*) die "the venv must not be inside the bundle ($source_dir)" ;;
        "$data_dir"/*|"$key_dir"/*) die "the venv must not be inside the data directory ($data_dir): its user could change what root runs" ;;
    esac
    if [ "$(id -u)" -eq 0 ]; then
        check_root_path "$venv"
        check_root_path "$(realpath -m -- "$venv")"
        copy_bundle
    fi

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
}

main; exit
