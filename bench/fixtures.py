"""Certificates and a large database for the benchmarks, made cheaply.

Real issuance is not what is measured, so one ECDSA P-256 key and one two-certificate chain
(a CA and a leaf) are reused for every name. 100,000 names are stored by saving one
certificate through the store's own API and cloning its row in SQL, which takes a second or
two instead of the minutes 100,000 separate transactions would (the status index is cloned
with them).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# The drivers measure a `serve` process by its pid: every one they start runs as a single
# process unless a driver passes `--workers` itself (bench/workers.py).
os.environ.setdefault("AUTOCERT_WORKERS", "1")

BENCH_DOMAIN = "bench.test"
#: The ACME directory the bench servers are given: nothing listens there, so no server orders
#: or renews anything while it is measured.
UNREACHABLE_CA = "https://127.0.0.1:9/directory"


def name_for(index: int) -> str:
    return f"n{index}.{BENCH_DOMAIN}"


def held_name_for(index: int) -> str:
    """An allowed name without a certificate whose last order failed: held back by its backoff."""
    return f"h{index}.{BENCH_DOMAIN}"


@dataclass(frozen=True)
class Chain:
    key_pem: bytes
    chain_pem: bytes  # leaf, then the CA
    ca_pem: bytes

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Key and chain as files, for servers that only read paths (nginx, load_cert_chain)."""
        key, chain = directory / "key.pem", directory / "chain.pem"
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        chain.write_bytes(self.chain_pem)
        return key, chain


def make_chain(common_name: str = f"n0.{BENCH_DOMAIN}") -> Chain:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "autocert bench CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=300))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Chain(
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        chain_pem=leaf.public_bytes(pem) + ca.public_bytes(pem),
        ca_pem=ca.public_bytes(pem),
    )


async def _seed(url: str, chain: Chain, directory: str) -> None:
    from autocert._store import Store

    store = await Store.open(url)
    try:
        now = dt.datetime.now(dt.UTC)
        await store.allow([name_for(0)])
        await store.save_certificate(
            name=name_for(0), names=[name_for(0)], key_pem=chain.key_pem, chain_pem=chain.chain_pem,
            serial="01", issuer="CN=autocert bench CA", not_before=now - dt.timedelta(days=1),
            not_after=now + dt.timedelta(days=300), renew_at=now + dt.timedelta(days=200), directory=directory,
        )
    finally:
        await store.close()


def _allow_like_the_first(db: sqlite3.Connection, prefix: str, first: int, last: int) -> None:
    """Allow ``{prefix}{first}`` to ``{prefix}{last}`` under the bench domain, cloned from the first name's row."""
    db.execute(
        f"""
        WITH RECURSIVE seq(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM seq WHERE i < {last})
        INSERT INTO allowed (entry, added_at, cap)
        SELECT '{prefix}' || seq.i || '.{BENCH_DOMAIN}', a.added_at, NULL FROM seq, allowed AS a WHERE a.entry = '{name_for(0)}'
        """
    )


def build_database(path: Path, count: int, chain: Chain, directory: str, *, held: int = 0) -> str:
    """An SQLite database with ``count`` allowed names, each with a valid stored certificate,
    and ``held`` allowed names in backoff (a failed order, the next attempt a day away)."""
    if path.exists():
        path.unlink()
    url = f"sqlite:///{path}"
    asyncio.run(_seed(url, chain, directory))
    far = (dt.datetime.now(dt.UTC) + dt.timedelta(days=200)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with sqlite3.connect(path) as db:
        # No renewal-information fetches during the benchmark: the CA is not reachable.
        db.execute("UPDATE certificates SET ari_next_check_at = ?", (far,))
        db.execute(
            f"""
            WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < {count - 1})
            INSERT INTO certificates (name, names, key_pem, chain_pem, serial, issuer, not_before, not_after,
                                      renew_at, directory, order_url, profile, created_at, revoked_at, ari_next_check_at)
            SELECT 'n' || seq.i || '.{BENCH_DOMAIN}', json_array('n' || seq.i || '.{BENCH_DOMAIN}'), c.key_pem, c.chain_pem,
                   printf('%x', seq.i + 1), c.issuer, c.not_before, c.not_after, c.renew_at, c.directory, c.order_url,
                   c.profile, c.created_at, NULL, c.ari_next_check_at
            FROM seq, certificates AS c WHERE c.id = 1
            """
        )
        _allow_like_the_first(db, "n", 1, count - 1)
        # The status index: the first name's row again for every cloned certificate.
        db.execute(
            """
            INSERT INTO names (name, listed, allowed, certificate_id, not_before, not_after, renew_at, issuer, serial, directory,
                               soon_at, attempts, failures, last_error, next_attempt_at)
            SELECT c.name, n.listed, n.allowed, c.id, n.not_before, n.not_after, n.renew_at, n.issuer, c.serial, c.directory,
                   n.soon_at, n.attempts, n.failures, n.last_error, n.next_attempt_at
            FROM certificates AS c, names AS n WHERE n.certificate_id = 1 AND c.id > 1
            """
        )
        if held:
            later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S.%f")
            _allow_like_the_first(db, "h", 0, held - 1)
            db.execute(
                f"""
                WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < {held - 1})
                INSERT INTO name_states (name, failures, next_attempt_at, last_error)
                SELECT 'h' || seq.i || '.{BENCH_DOMAIN}', 1, ?, 'urn:ietf:params:acme:error:connection: refused' FROM seq
                """,
                (later,),
            )
        stored = db.execute("SELECT count(*) FROM certificates").fetchone()[0]
    if stored != count:
        raise RuntimeError(f"expected {count} certificates, stored {stored}")
    return url
