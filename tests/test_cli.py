"""The command line as a user meets it: exit codes, JSON shapes, and bad input that writes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sqlite3
from pathlib import Path

import pytest

import autocert
from support import run_cli


def snapshot(db: str, *, skip: tuple[str, ...] = ()) -> str:
    """A digest of every row of every table (but ``skip``): equal digests mean nothing was written."""
    path = db.removeprefix("sqlite:///")
    digest = hashlib.sha256()
    with sqlite3.connect(path) as connection:
        for (table,) in connection.execute("select name from sqlite_master where type='table' order by name"):
            if table in skip:
                continue
            for row in connection.execute(f"select * from {table} order by 1"):
                digest.update(repr((table, row)).encode())
    return digest.hexdigest()


def test_version_and_module_entry_point() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"autocert {autocert.__version__}"


def test_db_upgrade_creates_a_private_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "fresh.db"
    result = run_cli("db", "upgrade", db=f"sqlite:///{path}")
    assert result.returncode == 0, result.stderr
    assert "revision" in result.stdout
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert run_cli("db", "upgrade", db=f"sqlite:///{path}").returncode == 0  # idempotent


def test_db_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.db"
    assert run_cli("allow", "env.example.test", env={"AUTOCERT_DB": f"sqlite:///{path}"}).returncode == 0
    assert path.exists()


def test_allow_list_disallow_roundtrip_with_unicode(db: str) -> None:
    result = run_cli("allow", "Bücher.Example.", "*.tenants.example", "a.example.test", db=db)
    assert result.returncode == 0, result.stderr
    assert run_cli("allow", "a.example.test", db=db).returncode == 0  # idempotent

    listed = json.loads(run_cli("list", "--json", db=db).stdout)
    names = [item["name"] for item in listed["allowed"]]
    assert sorted(names) == ["*.tenants.example", "a.example.test", "xn--bcher-kva.example"]
    assert all(item["added_at"].endswith("Z") or "+00:00" in item["added_at"] for item in listed["allowed"])
    # --json before the subcommand works too.
    assert json.loads(run_cli("--json", "list", db=db).stdout) == listed

    assert run_cli("disallow", "a.example.test", db=db).returncode == 0
    listed = json.loads(run_cli("list", "--json", db=db).stdout)
    assert "a.example.test" not in [item["name"] for item in listed["allowed"]]


def test_status_json_shape_for_a_pending_name(db: str) -> None:
    run_cli("allow", "pending.example.test", db=db)
    report = json.loads(run_cli("status", "--json", db=db).stdout)
    (entry,) = report["certificates"]
    assert set(entry) >= {"name", "state", "not_before", "not_after", "renew_at", "serial", "issuer", "directory",
                          "attempts", "last_error", "next_attempt_at"}
    assert entry["name"] == "pending.example.test"
    assert entry["state"] == "pending"
    assert entry["attempts"] == 0
    assert entry["serial"] is None and entry["not_after"] is None and entry["last_error"] is None


BAD_INPUTS = [
    (["allow", "192.0.2.256"], "malformed IPv4 address"),
    (["allow", "ok.example.test", "[2001:db8:::1]"], "malformed IPv6 address"),
    (["allow", "*.0.2.1"], "not IP addresses"),
    (["allow", "a..example.test"], "empty label"),
    (["allow", "x" * 64 + ".example.test"], "63"),
    (["allow", ".".join(["a" * 60] * 5)], "253"),
    (["allow", "bad_char!.example.test"], ""),
    (["allow", "*.*.example.test"], ""),
    (["disallow", "a..b"], "empty label"),
    (["status", "192.0.2.1.5"], "malformed IPv4 address"),
    (["issue", "not-allowed.example.test", "--http", "127.0.0.1:1", "--directory", "https://127.0.0.1:1/dir"], "not allowed"),
    (["issue", "ok.example.test", "--wait", "soon"], "--wait"),
    (["serve", "--https", "nonsense"], "--https"),
    (["serve", "--https", "none", "--https", "127.0.0.1:0"], "--https"),
    (["serve", "--http", "127.0.0.1:0,nonsense"], "--http"),
    (["serve", "--host-check", "maybe", "--https", "127.0.0.1:0", "--http", "none", "--admin", "none"], "--host-check"),
    (["serve", "--admin", "0.0.0.0:0"], "admin-token"),
    (["serve", "--cache-size", "0"], "--cache-size"),
    (["serve", "--workers", "0"], "--workers"),
    (["serve", "--workers", "every"], "--workers"),
    (["serve", "--workers", "2", "--cache-size", "0"], "--cache-size"),
    (["serve", "--workers", "2", "--upstream", "ftp://files.example", "--https", "127.0.0.1:0", "--http", "none", "--admin", "none"],
     "--upstream"),
    (["serve", "--workers", "2", "--order-limit", "300/0h", "--https", "127.0.0.1:0", "--http", "none", "--admin", "none"],
     "--order-limit"),
    (["allow", "a.example.test", "--cap", "2"], "patterns only"),
    (["allow", "*.example.test", "--cap", "0"], "--cap"),
    (["allow", "*.example.test", "--cap", "9223372036854775808"], "at most"),
    (["allow", "*.example.test", "--cap", "3000000000"], "at most"),
    (["issue", "ok.example.test", "--order-limit", "300"], "--order-limit"),
    (["issue", "ok.example.test", "--order-limit", "0/3h"], "--order-limit"),
    (["issue", "ok.example.test", "--order-limit", "300/3 hours"], "--order-limit"),
    (["serve", "--order-limit", "300/0h", "--https", "127.0.0.1:0", "--http", "none", "--admin", "none"], "--order-limit"),
    (["issue", "ok.example.test", "--ca-bundle", "/nonexistent/ca.pem"], "--ca-bundle"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(db: str, argv: list[str], message: str) -> None:
    assert run_cli("allow", "ok.example.test", db=db).returncode == 0
    before = snapshot(db)
    result = run_cli(*argv, db=db)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert snapshot(db) == before


def test_bad_database_url_is_a_usage_error() -> None:
    result = run_cli("list", db="mysql://nowhere/db")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "mysql" in result.stderr


def test_unknown_subcommand_is_usage_error() -> None:
    assert run_cli("frobnicate").returncode == 2


def test_a_cap_over_what_postgresql_stores_is_refused_in_one_line_and_writes_nothing(postgres_url: str) -> None:
    """PostgreSQL's integer column stops at 2^31 - 1, SQLite's at 2^63 - 1: both are refused
    before the database sees them (the SQLite case is in BAD_INPUTS)."""
    assert run_cli("allow", "*.ok.example.test", "--cap", "5", db=postgres_url).returncode == 0
    for cap in ("3000000000", "9223372036854775808"):
        result = run_cli("allow", "*.big.example.test", "--cap", cap, db=postgres_url)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "--cap" in line and "at most" in line, line
    listed = json.loads(run_cli("list", "--json", db=postgres_url).stdout)
    assert [item["name"] for item in listed["allowed"]] == ["*.ok.example.test"]
