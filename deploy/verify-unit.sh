#!/usr/bin/env bash
# Check a systemd unit file with `systemd-analyze verify`, also where systemd is not running (containers, CI) and
# the program is not installed yet. Exits non-zero on any error *or warning* about the unit (systemd-analyze itself
# exits 0 on warnings such as "Unknown key"). Then prints the `systemd-analyze security --offline=yes` exposure
# score for information only.
#
#   deploy/verify-unit.sh [UNIT_FILE]     (default: retrain-uploader.service beside this script)
#
# How it works offline: the unit is copied under its own name into a temporary folder, and each Exec*= program that
# does not exist on this machine (e.g. /opt/retrain-uploader/venv/bin/retrain-uploader before install.sh ran) is
# replaced by an executable stub there, arguments untouched. Everything else in the unit is checked as written.
# --man=no: Documentation= man pages need not be installed; --generators=no: no generators (they need a running
# systemd and write to /run).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
unit=${1:-"$here/retrain-uploader.service"}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "verify-unit: systemd-analyze not found" >&2
    exit 127
fi
if [[ ! -f $unit ]]; then
    echo "verify-unit: no such unit file: $unit" >&2
    exit 2
fi

name=$(basename "$unit")
work=$(mktemp -d "${TMPDIR:-/tmp}/verify-unit.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
mkdir "$work/stubs"

# Copy the unit, swapping missing Exec*= programs for stubs.
stubbed=()
while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line =~ ^(Exec[A-Za-z]+=[-@:+!]*)([^[:space:]]+)(.*)$ ]]; then
        prefix=${BASH_REMATCH[1]} program=${BASH_REMATCH[2]} rest=${BASH_REMATCH[3]}
        if [[ $program == /* && ! -x $program ]]; then
            stub="$work/stubs/$(basename "$program")"
            printf '#!/bin/sh\nexit 0\n' >"$stub"
            chmod 0755 "$stub"
            stubbed+=("$program")
            line="$prefix$stub$rest"
        fi
    fi
    printf '%s\n' "$line"
done <"$unit" >"$work/$name"

for program in ${stubbed[@]+"${stubbed[@]}"}; do
    echo "verify-unit: $program is not installed here; checked with a stub in its place"
done

status=0
output=$(cd "$work" && SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no --generators=no "$work/$name" 2>&1) || status=$?

# Messages about this unit name it (or its path); anything else comes from units it pulls in (targets etc.).
problems=$(grep -F -- "$name" <<<"$output" || true)
others=$(grep -vF -- "$name" <<<"$output" || true)
if [[ -n $others ]]; then
    echo "verify-unit: notes about other units (not counted):"
    sed 's/^/  /' <<<"$others"
fi

# systemd-analyze accepts dependencies on units that do not exist (a typo in After= or WantedBy= is silent).
add_problem() { problems+=${problems:+$'\n'}"$name: $*"; }
mapfile -t unit_dirs < <(systemd-analyze unit-paths 2>/dev/null || true)
unit_suffix='\.(service|socket|device|mount|automount|swap|target|path|timer|slice|scope)$'
while IFS= read -r dep; do
    if [[ ! $dep =~ $unit_suffix ]]; then
        add_problem "not a unit name in a dependency: $dep"
        continue
    fi
    found=no
    for dir in ${unit_dirs[@]+"${unit_dirs[@]}"}; do
        # foo@bar.service is provided by foo@bar.service or the template foo@.service
        [[ -e $dir/$dep || -e $dir/${dep%%@*}@.${dep##*.} ]] && { found=yes; break; }
    done
    [[ $found == yes ]] || add_problem "dependency on a unit that is not installed here: $dep"
done < <(sed -nE 's/^[[:space:]]*(Wants|Requires|Requisite|BindsTo|PartOf|Upholds|After|Before|WantedBy|RequiredBy|Also)[[:space:]]*=//p' "$unit" |
    tr -s ' \t' '\n' | sed '/^$/d' | sort -u)

if [[ $status -ne 0 || -n $problems ]]; then
    echo "verify-unit: FAILED: $unit (systemd-analyze verify exit $status)" >&2
    [[ -n $problems ]] && sed "s|$work/|${unit%"$name"}|g; s/^/  /" <<<"$problems" >&2
    exit 1
fi
echo "verify-unit: OK: $unit ($(systemd-analyze --version | head -n1))"

# Exposure score: information only, never fails the check.
if security=$(cd "$work" && SYSTEMD_LOG_COLOR=0 systemd-analyze security --offline=yes --no-pager "$work/$name" 2>/dev/null); then
    echo "verify-unit: settings systemd-analyze security still counts against the unit:"
    grep -E '[0-9]\.[0-9]+[[:space:]]*$' <<<"$security" | grep -v 'Overall' | sed 's/^/  /' || true
    grep -E 'Overall exposure level' <<<"$security" | sed -E "s|$work/||; s/^[^A-Za-z]*/verify-unit: /" || true
else
    echo "verify-unit: systemd-analyze security --offline=yes is not supported here; no exposure score"
fi
