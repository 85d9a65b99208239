#!/usr/bin/env bash
# One app, many tenants, each on its own name under tenants.example with its own certificate,
# issued the first time a visitor reaches that name. Nothing to do per tenant: point a wildcard
# DNS record (*.tenants.example) at this server and run this script.
#
#   UPSTREAM=http://127.0.0.1:8000 AUTOCERT_EMAIL=ops@tenants.example examples/multi_tenant.sh
#
# Every autocert setting can come from its environment variable (AUTOCERT_DB, AUTOCERT_DIRECTORY,
# AUTOCERT_HTTPS, AUTOCERT_HTTP, AUTOCERT_ADMIN, ...); extra arguments go to `autocert serve`.
# The script runs `autocert serve` in the foreground (exec), so SIGTERM stops it gracefully.
#
# Mind the cost of a pattern. `*.tenants.example` allows ANY single label under it, so anyone
# can make this server order a certificate by sending a made-up name such as
# x83h1.tenants.example (with wildcard DNS it validates), and every such order counts against
# the CA's limits (Let's Encrypt: 300 new orders per account per 3 hours, 50 certificates per
# registered domain per week). So the pattern is allowed with a cap: at most TENANT_CAP
# distinct names under it are ever ordered (default 100); past that, new names are refused
# like unknown ones while the names already issued keep being served and renewed. Raise the
# cap as you sign up tenants (run `autocert allow '*.tenants.example' --cap N` again), or allow
# each tenant explicitly when it signs up (`autocert allow acme.tenants.example`: an explicitly
# allowed name is ordered whatever the cap), and watch `autocert status` for names nobody
# asked for.
set -euo pipefail

PATTERN="${TENANT_PATTERN:-*.tenants.example}"
CAP="${TENANT_CAP:-100}"
: "${UPSTREAM:?set UPSTREAM to the URL of the app, e.g. UPSTREAM=http://127.0.0.1:8000}"
# The command to run; word-split on purpose so that AUTOCERT="python -m autocert" works.
AUTOCERT=${AUTOCERT:-autocert}

$AUTOCERT allow "$PATTERN" --cap "$CAP"
echo "multi_tenant: allowed $PATTERN (at most $CAP names); serving it in front of $UPSTREAM"
# --agree-tos: running this accepts the terms of service of the CA in AUTOCERT_DIRECTORY.
exec $AUTOCERT serve --upstream "$UPSTREAM" --agree-tos "$@"
