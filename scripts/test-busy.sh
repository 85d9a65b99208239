#!/usr/bin/env bash
# Runs the test suite (arguments as for scripts/test.sh) while stress-ng keeps every CPU busy:
# tests must hold on a machine busy with other work, as CI and new users' machines are.
set -euo pipefail
cd "$(dirname "$0")/.."
AUTOCERT_SETUP_STRESS=1 bash scripts/setup.sh
stress-ng --cpu "$(nproc)" --timeout 3600 --quiet &
stress=$!
trap 'kill "$stress" 2>/dev/null || true; wait "$stress" 2>/dev/null || true' EXIT
echo "test-busy: every CPU kept busy by stress-ng (pid $stress)" >&2
bash scripts/test.sh "$@"
