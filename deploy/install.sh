#!/usr/bin/env bash
# Install or update retrain-uploader as a systemd service. Idempotent: run it again to upgrade; it never overwrites
# an existing config.toml, key files or inbox folders.
#
#   sudo deploy/install.sh [--dry-run] [--python PATH] [--inbox-root DIR]... [--wheelhouse DIR] [SOURCE_DIR]
#
#   SOURCE_DIR         the project to install (default: the folder above this script)
#   --dry-run          print the commands instead of running them (no root needed)
#   --python PATH      interpreter for the venv, 3.11 or newer (default: /usr/bin/python3, else python3 on PATH)
#   --inbox-root DIR   a folder holding model inboxes (repeatable; default /srv/retrain). Roots other than
#                      /srv/retrain are added to the unit's ReadWritePaths= by a drop-in.
#   --wheelhouse DIR   install offline: pip takes the project's dependencies and build backend only from the wheels
#                      in DIR (pip wheel --wheel-dir DIR SOURCE_DIR setuptools, on a machine with the same Python)
set -euo pipefail
umask 022

SERVICE=retrain-uploader
SERVICE_USER=retrain-uploader
SERVICE_GROUP=retrain-uploader
PREFIX=/opt/retrain-uploader
VENV=$PREFIX/venv
ETC_DIR=/etc/retrain-uploader
UNIT_DIR=/etc/systemd/system
UNIT_PATH=$UNIT_DIR/$SERVICE.service
DROPIN_PATH=$UNIT_DIR/$SERVICE.service.d/inbox-roots.conf
DEFAULT_INBOX_ROOT=/srv/retrain

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dry_run=0
python=""
src=""
inbox_roots=()
wheelhouse=""

usage() { sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
die() { echo "install.sh: $*" >&2; exit 1; }

while (($#)); do
    case $1 in
        --dry-run) dry_run=1 ;;
        --python) python=${2:?--python needs a path}; shift ;;
        --python=*) python=${1#*=} ;;
        --inbox-root) inbox_roots+=("${2:?--inbox-root needs a folder}"); shift ;;
        --inbox-root=*) inbox_roots+=("${1#*=}") ;;
        --wheelhouse) wheelhouse=${2:?--wheelhouse needs a folder}; shift ;;
        --wheelhouse=*) wheelhouse=${1#*=} ;;
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) [[ -z $src ]] || die "only one SOURCE_DIR"; src=$1 ;;
    esac
    shift
done
src=$(cd "${src:-$here/..}" && pwd)
((${#inbox_roots[@]})) || inbox_roots=("$DEFAULT_INBOX_ROOT")

# run CMD...: run it, or under --dry-run print it (shell-quoted, one line, prefixed with "+").
run() {
    if ((dry_run)); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}
# write_file PATH MODE < CONTENT: write a root-owned file, or under --dry-run show what would be written.
write_file() {
    local content
    content=$(cat)
    if ((dry_run)); then
        printf '+ write %s (mode %s):\n' "$1" "$2"
        sed 's/^/|   /' <<<"$content"
    else
        install -m "$2" -o root -g root /dev/stdin "$1" <<<"$content"
    fi
}
note() { echo "== $*"; }

# --- checks (read-only, also under --dry-run) ---------------------------------------------------------------------------
((dry_run)) || ((EUID == 0)) || die "run as root (or try --dry-run)"
for f in pyproject.toml config/config.example.toml deploy/$SERVICE.service; do
    [[ -f $src/$f ]] || die "$src does not look like the retrain-uploader project: no $f"
done
if [[ -z $python ]]; then
    if [[ -x /usr/bin/python3 ]]; then python=/usr/bin/python3; else python=$(command -v python3 || true); fi
fi
[[ -n $python && -x $(command -v "$python" || true) ]] || die "no python3 found; install it (apt-get install python3 python3-venv) or pass --python"
python_real=$(readlink -f "$(command -v "$python")")
# The venv links to its interpreter, and the unit has ProtectHome=yes: an interpreter under /root or /home (pyenv,
# conda, ~/.local) would be invisible to the service and it would fail to start.
case $python_real in
    /root/* | /home/* | /run/user/*) die "$python resolves to $python_real, which the service cannot see (ProtectHome=yes); use a system python, e.g. --python /usr/bin/python3" ;;
esac
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$python is older than Python 3.11"
"$python" -c 'import ensurepip, venv' 2>/dev/null || die "$python cannot create virtual environments (apt-get install python3-venv)"
nologin=$(command -v nologin || true)
nologin=${nologin:-/usr/sbin/nologin}
pip_source=()
if [[ -n $wheelhouse ]]; then
    [[ -d $wheelhouse ]] || die "--wheelhouse $wheelhouse is not a folder"
    pip_source=(--no-index --find-links "$(cd "$wheelhouse" && pwd)")
fi
for root in "${inbox_roots[@]}"; do
    [[ $root == /* ]] || die "--inbox-root must be an absolute path: $root"
done

((dry_run)) && note "dry run: nothing is changed; these are the commands an install runs"
note "installing $src with $python_real ($("$python" -c 'import platform; print(platform.python_version())'))"

# --- service user and group ------------------------------------------------------------------------------------------
if getent group "$SERVICE_GROUP" >/dev/null; then
    note "group $SERVICE_GROUP exists"
else
    run groupadd --system "$SERVICE_GROUP"
fi
if getent passwd "$SERVICE_USER" >/dev/null; then
    note "user $SERVICE_USER exists (no useradd needed)"
else
    run useradd --system --gid "$SERVICE_GROUP" --no-create-home --home-dir /nonexistent --shell "$nologin" \
        --comment "Prediction One retrain uploader" "$SERVICE_USER"
fi

# --- program: a venv owned by root, readable by all, writable by root only -------------------------------------------
run install -d -m 0755 -o root -g root "$PREFIX"
if [[ -x $VENV/bin/python ]]; then
    note "venv $VENV exists; upgrading the project in it"
else
    run "$python" -m venv "$VENV"
fi
# Build from a clean copy: pip builds in the source tree, and a stale build/ there can put deleted modules back.
if ((dry_run)); then
    stage='<temporary folder>'
    echo "+ copy $src to $stage (without .git .venv build *.egg-info __pycache__)"
else
    stage=$(mktemp -d "${TMPDIR:-/tmp}/retrain-uploader-src.XXXXXX")
    trap 'rm -rf -- "$stage"' EXIT
    tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude='.*_cache' --exclude=./.hypothesis -cf - . | tar -C "$stage" -xf -
fi
run "$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir "${pip_source[@]}" --upgrade "$stage"

# --- documentation, named by the unit's Documentation= ------------------------------------------------------------------
run install -d -m 0755 -o root -g root "$PREFIX/doc"
run install -m 0644 -o root -g root "$src/README.md" "$PREFIX/doc/README.md"
run install -m 0644 -o root -g root "$src/deploy/README.md" "$PREFIX/doc/deploy-README.md"

# --- configuration: root-owned, readable by the service group only ---------------------------------------------------
run install -d -m 0750 -o root -g "$SERVICE_GROUP" "$ETC_DIR"
run install -d -m 0750 -o root -g "$SERVICE_GROUP" "$ETC_DIR/keys"
if [[ -e $ETC_DIR/config.toml ]]; then
    note "$ETC_DIR/config.toml exists; kept as it is"
else
    run install -m 0640 -o root -g "$SERVICE_GROUP" "$src/config/config.example.toml" "$ETC_DIR/config.toml"
fi

# --- inbox roots: owned by the service user (it creates <root>/<model>/{done,failed} itself) -------------------------
extra_roots=()
for root in "${inbox_roots[@]}"; do
    if [[ -d $root ]]; then
        owner=$(stat -c %U "$root")
        note "inbox root $root exists (owner $owner); left as it is"
        [[ $owner == "$SERVICE_USER" ]] ||
            echo "   make sure $SERVICE_USER can write in it, e.g.: chown $SERVICE_USER:$SERVICE_GROUP $root" >&2
    else
        run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_GROUP" "$root"
    fi
    [[ $root == "$DEFAULT_INBOX_ROOT" ]] || extra_roots+=("$root")
done

# --- systemd unit ------------------------------------------------------------------------------------------------------
run install -d -m 0755 -o root -g root "$UNIT_DIR"
run install -m 0644 -o root -g root "$src/deploy/$SERVICE.service" "$UNIT_PATH"
if ((${#extra_roots[@]})); then
    # ProtectSystem=strict makes everything read-only but the StateDirectory and ReadWritePaths=.
    run install -d -m 0755 -o root -g root "$(dirname "$DROPIN_PATH")"
    {
        echo "# Written by deploy/install.sh: inbox roots besides $DEFAULT_INBOX_ROOT (one line per root)."
        echo "[Service]"
        printf 'ReadWritePaths=%s\n' "${extra_roots[@]}"
    } | write_file "$DROPIN_PATH" 0644
fi
if [[ -d /run/systemd/system ]]; then
    run systemctl daemon-reload
else
    note "systemd is not running here: skipped systemctl daemon-reload"
fi

cat <<EOF

Installed $SERVICE. Next steps:
  1. Edit $ETC_DIR/config.toml: one [[models]] block per model, inbox under ${inbox_roots[0]}.
  2. Put each model's API key in $ETC_DIR/keys/<model> (one line):
       install -m 0640 -o root -g $SERVICE_GROUP /dev/stdin $ETC_DIR/keys/churn <<<'KEY'
     or use api_key_credential and a LoadCredential= line (systemctl edit $SERVICE); see deploy/README.md.
  3. Check it as the service user:
       runuser -u $SERVICE_USER -- $VENV/bin/$SERVICE check-config --config $ETC_DIR/config.toml
  4. Start it and follow its log:
       systemctl enable --now $SERVICE
       systemctl status $SERVICE
       journalctl -u $SERVICE -f -o cat
EOF
