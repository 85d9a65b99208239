#!/usr/bin/env bash
# Runs autocert's whole test suite on a fresh Debian machine: installs what it needs,
# makes sure the local PostgreSQL is up for the store tests, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k store`).
set -euo pipefail
cd "$(dirname "$0")/.."
AUTOCERT_SETUP_BROWSER=1 bash scripts/setup.sh

if command -v pg_isready >/dev/null 2>&1; then
    if ! pg_isready -q -h 127.0.0.1 -p 5432 && [ -d /etc/postgresql ]; then
        echo "test: starting PostgreSQL" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
        for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
    fi
    if pg_isready -q -h 127.0.0.1 -p 5432; then
        export AUTOCERT_TEST_POSTGRES_URL=${AUTOCERT_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}
    fi
fi
[ -n "${AUTOCERT_TEST_POSTGRES_URL:-}" ] || echo "test: no PostgreSQL reachable: its store tests will be skipped" >&2

# pytest exits 5 when it collects nothing; that is a failure here like any other non-zero.
exec .venv/bin/python -m pytest "$@"
