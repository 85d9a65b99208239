"""Persistent state behind autocert, on SQLite (one host) or PostgreSQL (several instances).

This package is the only code that writes SQL. It hands out frozen dataclasses
(:mod:`.records`), never ORM objects, so nothing above it can run a query by accident.
:class:`Store` is one class made of a part per aggregate, each over the shared base in
:mod:`.engine` (engine, sessions, key sealer, lifecycle and migrations): :mod:`.allowlist`,
:mod:`.accounts`, :mod:`.certificates` (with pending orders), :mod:`.attempts` (with
backoff and leases), :mod:`.challenges` and :mod:`.dns_records`; :mod:`.listener` hears
PostgreSQL's change notifications; :mod:`.names` keeps the status index those
writes summarise, and :mod:`.status` answers status pages and counts from it, with
predicates that :mod:`.rules` derives from the state rules.

What follows is the store's contract: what callers may rely on, on both backends.

Writes
    Every write is one short transaction, committed before the method returns: all of it
    lands or none of it does. What goes together in one transaction:

    - ``allow`` and ``disallow`` change the entries and move the allowlist version, so a
      server that sees the new version (``change_marks``) sees the whole change.
    - On PostgreSQL, ``allow``, ``disallow``, ``save_certificate`` and ``mark_revoked`` send
      ``NOTIFY autocert_changes`` in their transaction: listeners (``change_listener``) hear
      of a change only once it is committed, and never of one rolled back.
    - ``claim_under_cap`` checks a pattern's cap and takes the name's place under it, and
      ``start_attempt_within`` counts the account's orders and starts the attempt, each in
      one transaction serialised with its kind (a row lock on the pattern, an advisory lock
      on PostgreSQL; the write lock on SQLite): instances racing never pass a cap or budget.
    - ``finish_attempt`` closes the attempt and updates the name's failure count and last
      error (a success also clears the backoff); finishing an attempt twice raises
      :class:`StoreError` instead of counting a failure twice. The time of the next try is
      a separate write (``set_next_attempt``).
    - ``save_certificate`` stores the certificate and forgets the name's pending order, so a
      crash right after cannot make a restart store the same certificate twice.
    - ``save_account`` creates the account or updates its URL and contact, and never
      replaces a stored key: of two processes creating the same account, one key is stored
      and both get that one back.
    - Leases (``try_lease``, ``release_lease``), backoff times, pending orders, renewal
      times, revocations and http-01 answers are each a single statement, most of them an
      upsert (``INSERT ... ON CONFLICT``).

Races between processes
    A server and the CLI, or several servers sharing PostgreSQL, may call any method at the
    same time; nothing relies on a lock held in memory. Conflicts are settled in the
    database:

    - A lease decides which process orders a name. ``try_lease`` is one upsert that takes
      the lease only when it is free, expired or already the caller's; both databases
      serialise conflicting upserts on the row, so of two racing processes exactly one
      holds it. A lease ends when released or when ``lease_until`` passes; a holder that
      outlives it may lose it, and ``release_lease`` then returns False.
    - Account creation and allowlist inserts use ``ON CONFLICT``, so racing inserts do not
      fail and do not duplicate rows.
    - On PostgreSQL, migrating takes an advisory lock until commit (a second process waits,
      then finds nothing to do), and so does storing a certificate, so that certificate ids
      become visible in increasing order: ``certificates_since`` may poll by the highest id
      seen.
    - On SQLite, the file runs in WAL mode (readers never block the writer) with a busy
      timeout, and write transactions start with ``BEGIN IMMEDIATE``, so that two processes
      queue for the write lock instead of failing when a read turns into a write.
    - What a read returns may be outdated by the time the caller acts on it; the writes
      above settle conflicts, not the reads before them.

Current certificate
    A name's current certificate is an unrevoked one for which no unrevoked certificate for
    the same name lasts longer (later ``not_after``); ties go to the newer id. It may have
    expired. Every query about current certificates (``current_certificate(s)``,
    ``renewals_due``, ``renewal_info_due``, ``expiry_overview``, ``next_due``) uses this one
    definition.

Status index
    One row per known name (table ``names``) holds what status queries filter, sort and count
    on: allowed or not, the current certificate's times, issuer, serial and directory, the
    number of attempts, the failures, last error and next attempt. Every write that changes
    one of those updates the row in the same transaction, so a status read sees the index and
    the tables it summarises agree; ``rebuild_names`` recomputes it from them, and runs after
    migrating a database from before the index. Status reads (``status_page``,
    ``status_rows``, ``status_counts``) see one snapshot of the database each (REPEATABLE READ
    on PostgreSQL).

Clocks
    Times are computed on the caller's host, never by the database: aware datetimes go in
    and aware UTC datetimes come out. Instances sharing PostgreSQL must keep their clocks in sync (they
    need that for TLS validity checks anyway); lease lengths should be far longer than the
    expected skew.

Keys
    Private keys (accounts, certificates, pending orders) are sealed with
    ``AUTOCERT_SECRET`` when it is set (or with the ``secret`` given to :meth:`Store.open`)
    and come back unsealed. Keys stored before a secret was set stay readable; a missing or
    wrong secret for sealed keys raises :class:`StoreError`.

Names
    Names and allowlist entries are expected in the form :mod:`autocert._names` produces;
    the store compares them as given. Only ``allow`` and ``disallow`` normalise their
    entries again, so that a caller's mistake cannot store an entry the SNI check never
    matches.

Errors
    A database that fails or cannot be reached raises :class:`StoreError`, with the
    driver's first line and never the SQL; a database URL or driver the store cannot use
    raises :class:`ConfigError`; arguments refused before any SQL runs (a naive datetime,
    a lease of no length) raise :class:`ValueError`.
"""

from __future__ import annotations

from .accounts import AccountsMixin
from .allowlist import AllowlistMixin
from .attempts import AttemptsMixin
from .certificates import CertificatesMixin
from .challenges import ChallengesMixin
from .dns_records import DnsRecordsMixin
from .status import SORTS, NameStatus, Position, StatusBatch, StatusCounts, StatusMixin, StatusPage, StatusQuery
from .engine import StoreBase, async_url, head_revision, migrations_path
from .records import (
    Account,
    AllowedEntry,
    Attempt,
    CertificateTimes,
    ChangeMarks,
    DnsRecord,
    ExpiryOverview,
    NameState,
    StoredCertificate,
)

__all__ = [
    "Account",
    "AllowedEntry",
    "Attempt",
    "CertificateTimes",
    "ChangeMarks",
    "DnsRecord",
    "ExpiryOverview",
    "NameState",
    "NameStatus",
    "Position",
    "SORTS",
    "StatusBatch",
    "StatusCounts",
    "StatusPage",
    "StatusQuery",
    "Store",
    "StoredCertificate",
    "async_url",
    "head_revision",
    "migrations_path",
]


class Store(AllowlistMixin, AccountsMixin, CertificatesMixin, AttemptsMixin, ChallengesMixin, DnsRecordsMixin, StatusMixin, StoreBase):
    """Async access to autocert's database; create it with :meth:`open`, end with :meth:`close`."""
