#!/usr/bin/env bash
# Installs what autocert's demo and tests need on Debian: system packages (as root, via
# apt-get) and a virtual environment in .venv with autocert and its test extras.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(pebble openssl curl ca-certificates python3-venv knot haproxy)
[ "${AUTOCERT_SETUP_BROWSER:-0}" = 1 ] && packages+=(chromium)
[ "${AUTOCERT_SETUP_STRESS:-0}" = 1 ] && packages+=(stress-ng)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$python" -m venv .venv
fi
stamp=.venv/.autocert-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing autocert into .venv (log: .venv/pip.log)" >&2
    if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e '.[test]'; } >.venv/pip.log 2>&1; then
        tail -n 30 .venv/pip.log >&2
        echo "setup: pip failed; the whole log is in .venv/pip.log" >&2
        exit 1
    fi
    touch "$stamp"
fi
