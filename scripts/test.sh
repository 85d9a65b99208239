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

# Most tests wait on real servers (Pebble, PostgreSQL, TLS peers), so the suite runs in one more
# process than there are CPUs (at least three): a third of the time of one process on 2 CPUs.
# AUTOCERT_TEST_PROCESSES=1 runs it in this process alone (for a debugger or -x).
processes=${AUTOCERT_TEST_PROCESSES:-$(( $(nproc) + 1 > 3 ? $(nproc) + 1 : 3 ))}
parallel=()
[ "$processes" -gt 1 ] && parallel=(-n "$processes")
# pytest exits 5 when it collects nothing; that is a failure here like any other non-zero.
exec .venv/bin/python -m pytest "${parallel[@]}" "$@"
