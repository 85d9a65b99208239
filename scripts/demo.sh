#!/usr/bin/env bash
# autocert end to end on this machine: a local ACME CA (Pebble), a sample web app and
# `autocert serve --upstream` in front of it, all on loopback. Installs what it needs first
# (scripts/setup.sh), then runs examples/demo.py until Ctrl-C; `--once` exits after the
# first HTTPS fetch. Everything it starts is stopped again and its temporary files removed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
