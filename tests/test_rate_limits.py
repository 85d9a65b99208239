"""A CA's ``rateLimited`` answer, end to end: a real ``autocert serve`` ordering from Pebble
through a relay (tests/ari_double.py) that refuses one name's new orders with ``Retry-After``.

The account-wide case and the renewals exempt from limits are pinned in process in
tests/test_renewal.py.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ari_double import AriDouble
from support import ServeProcess, cli_json, handshake, run_cli, served_certificate

HELD = "held.ratelimit.example.test"
FREE = "free.ratelimit.example.test"
RETRY_AFTER = 8


def orders_for(double: AriDouble, name: str) -> int:
    return sum(1 for order in double.orders if any(i["value"] == name for i in order.get("identifiers", [])))


def test_a_rate_limited_name_is_held_until_retry_after_while_other_names_issue(pebble, root_ca: str, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'limited.db'}"
    assert run_cli("allow", HELD, FREE, db=db).returncode == 0
    with AriDouble(pebble) as double:
        double.name_rate_limits[HELD] = ("too many certificates (5) already issued for this exact set of identifiers", RETRY_AFTER)
        server = ServeProcess(db, pebble, tmp_path, extra=["--directory", double.directory_url, "--first-contact-wait", "20"])
        with server:
            refused_at = datetime.now(UTC)
            with pytest.raises((ssl.SSLError, OSError)):
                handshake(server.https_port, HELD, cafile=root_ca)
            for _ in range(3):  # refused from memory while held: no new order
                with pytest.raises((ssl.SSLError, OSError)):
                    handshake(server.https_port, HELD, cafile=root_ca)
            assert datetime.now(UTC) < refused_at + timedelta(seconds=RETRY_AFTER), "the checks above ran inside the hold"
            assert orders_for(double, HELD) == 1, "no order for the held name before its Retry-After"
            served_certificate(server.https_port, FREE, root_ca)  # other names still issue

            (status,) = cli_json("status", HELD, db=db)["certificates"]
            assert status["state"] == "failed" and "rateLimited" in status["last_error"], status
            assert "exact set of identifiers" in status["last_error"], "the CA's own words"
            until = datetime.fromisoformat(status["next_attempt_at"])
            assert refused_at + timedelta(seconds=RETRY_AFTER - 2) <= until <= refused_at + timedelta(seconds=RETRY_AFTER + 30), \
                "held until the CA's Retry-After: not a 1-minute backoff, not at once"
            assert orders_for(double, HELD) == 1

            del double.name_rate_limits[HELD]  # the CA's limit is over
            served_certificate(server.https_port, HELD, root_ca, timeout=60)
            assert datetime.now(UTC) >= until
            assert orders_for(double, HELD) == 2
            (status,) = cli_json("status", HELD, db=db)["certificates"]
            assert status["state"] == "valid" and status["next_attempt_at"] is None, status
