"""Private keys at rest: sealed with AUTOCERT_SECRET, and a missing or wrong secret is reported."""

from __future__ import annotations

import asyncio
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from autocert._crypto import generate_private_key
from autocert._errors import StoreError
from autocert._sealing import SEALED_PREFIX, KeySealer
from autocert._store import Store
from support import ServeProcess, handshake, run_cli


def test_sealer_roundtrip_and_errors() -> None:
    pem = b"-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n"
    sealed = KeySealer("correct horse").seal(pem)
    assert sealed.startswith(SEALED_PREFIX) and b"PRIVATE KEY" not in sealed
    assert KeySealer("correct horse").unseal(sealed) == pem
    assert KeySealer(None).unseal(pem) == pem, "plaintext keys stay readable once a secret is set"
    assert KeySealer("correct horse").unseal(pem) == pem
    with pytest.raises(StoreError, match="set AUTOCERT_SECRET"):
        KeySealer(None).unseal(sealed)
    with pytest.raises(StoreError, match="does not match"):
        KeySealer("wrong").unseal(sealed)


async def test_store_seals_account_keys_and_updates_them_in_place(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sealed.db'}"
    store = await Store.open(url, secret="s3cret")
    try:
        pem = b"-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n"
        await store.save_account("https://ca.test/dir", pem, None, "a@example.test")
        updated = await store.save_account("https://ca.test/dir", pem, "https://ca.test/acct/1", "a@example.test")
        assert updated.key_pem == pem and updated.url == "https://ca.test/acct/1"
        kept = await store.save_account("https://ca.test/dir", b"another key", "https://ca.test/acct/2", None)
        assert kept.key_pem == pem and kept.url == "https://ca.test/acct/1", "an account key is never replaced"
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "sealed.db") as connection:
        (raw,) = connection.execute("select key_pem from accounts").fetchone()
    assert bytes(raw).startswith(SEALED_PREFIX) and b"PRIVATE KEY" not in bytes(raw)


def test_serve_with_secret_keeps_no_plaintext_key_and_needs_the_secret(pebble, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'secret.db'}"
    root = tmp_path / "root.pem"
    root.write_bytes(pebble.root_pem())
    env = {"AUTOCERT_SECRET": "a long operator secret"}
    assert run_cli("allow", "sealed.example.test", db=db).returncode == 0
    with ServeProcess(db, pebble, tmp_path, env=env) as server:
        handshake(server.https_port, "sealed.example.test", cafile=str(root), timeout=60)
    with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:
        blobs = [bytes(b) for (b,) in connection.execute("select key_pem from certificates union all select key_pem from accounts")]
    assert len(blobs) == 2 and all(b.startswith(SEALED_PREFIX) and b"PRIVATE KEY" not in b for b in blobs)

    # Without the secret, a command that needs a key says so in one line and exits 1.
    result = run_cli("renew", "sealed.example.test", "--force", "--http", f"127.0.0.1:{pebble.http01_port}",
                     "--directory", pebble.directory_url, "--ca-bundle", pebble.ca_bundle, "--agree-tos", db=db)
    assert result.returncode == 1
    assert "AUTOCERT_SECRET" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # With it, everything works again and the key is the same one.
    with ServeProcess(db, pebble, tmp_path, env=env) as server:
        handshake(server.https_port, "sealed.example.test", cafile=str(root), timeout=30)


def test_serve_with_a_wrong_secret_stops_at_start_and_healthz_reports_keys_turning_unreadable(pebble, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'wrong.db'}"
    right = {"AUTOCERT_SECRET": "the operator's secret"}
    root = tmp_path / "root.pem"
    root.write_bytes(pebble.root_pem())
    assert run_cli("allow", "sealed.example.test", db=db).returncode == 0
    with ServeProcess(db, pebble, tmp_path, env=right) as server:
        handshake(server.https_port, "sealed.example.test", cafile=str(root), timeout=60)
        assert urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/healthz", timeout=30).status == 200

        # Another instance with another secret writes a key: this server can no longer read every key.
        async def write_with_another_secret() -> None:
            other = await Store.open(db, secret="someone else's secret")
            await other.save_account("https://other-ca.example.test/dir", generate_private_key())
            await other.close()

        asyncio.run(write_with_another_secret())
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/healthz", timeout=30)
        assert unhealthy.value.code == 503 and b"AUTOCERT_SECRET" in unhealthy.value.read()

    wrong = run_cli("serve", "--https", "127.0.0.1:0", "--http", "none", "--admin", "none", "--directory", pebble.directory_url,
                    "--ca-bundle", pebble.ca_bundle, db=db, env={"AUTOCERT_SECRET": "a wrong secret"}, timeout=60)
    assert wrong.returncode != 0
    lines = wrong.stderr.strip().splitlines()
    assert "AUTOCERT_SECRET" in lines[-1] and not any("Traceback" in line for line in lines), wrong.stderr
