"""Our account at one CA: its ACME client, what we learned about the CA, and the limits kept there.

The worker holds one per configured CA and tries them in order. Everything that is per CA
lives here, so that a primary that is down, rate-limited or over its budget holds nothing back
at the next one: the account (keys are stored per directory), whether the CA publishes renewal
information, an account-wide ``rateLimited`` hold, and the budget kept below its limits.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import aiohttp

from ._crypto import generate_private_key
from ._issuers import Issuer, ca_label
from ._policy import RateBudget
from ._store import Store

if TYPE_CHECKING:
    from ._acme import AcmeClient


class CaAccount:
    """One CA of the worker's list, with the account autocert holds there."""

    def __init__(
        self,
        store: Store,
        issuer: Issuer,
        *,
        agree_tos: bool,
        budget: RateBudget | None,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        self._store = store
        self.issuer = issuer
        self.agree_tos = agree_tos
        #: The limits kept below the CA's (None: none of our own; the CA's answers decide).
        self.budget = budget
        self.trace_configs = trace_configs  # aiohttp TraceConfigs for the ACME client (metrics)
        #: Whether the CA publishes renewal information; None until its directory is read.
        self._renewal_info: bool | None = None
        #: Until when the CA said the whole account may place no new orders (``rateLimited``).
        self.held_until: datetime | None = None
        self._client: AcmeClient | None = None
        #: Orders (and lookups) using each client, and replaced clients still in use: a client
        #: is never closed under a request.
        self._client_users: collections.Counter[AcmeClient] = collections.Counter()
        self._retired: set[AcmeClient] = set()
        self._client_lock = asyncio.Lock()

    @property
    def directory(self) -> str:
        return self.issuer.directory

    @property
    def label(self) -> str:
        return ca_label(self.issuer.directory)

    def hold(self, until: datetime) -> None:
        """The CA rate-limited the whole account until ``until``: no new orders here before then."""
        self.held_until = max(self.held_until or until, until)

    async def close(self) -> None:
        clients = [*self._retired, *([self._client] if self._client is not None else [])]
        self._client, self._retired = None, set()
        self._client_users.clear()
        for client in clients:
            await client.close()

    async def acquire(self, *, stale: AcmeClient | None = None) -> AcmeClient:
        """The account-bound client, marked in use until :meth:`release`; created once, with
        the account key stored before first use.

        ``stale`` is a client whose account the CA no longer knows (a test CA restarted, an
        account deactivated): the first caller replaces it by one that registers the same key
        again, and every later caller with the same stale client gets that replacement. The
        stale client is closed only once no order uses it any more.
        """
        client = await self._current_client(stale)
        self._client_users[client] += 1
        return client

    async def release(self, client: AcmeClient) -> None:
        self._client_users[client] -= 1
        if self._client_users[client] <= 0:
            del self._client_users[client]
            if client in self._retired:
                self._retired.discard(client)
                await client.close()

    async def _current_client(self, stale: AcmeClient | None) -> AcmeClient:
        async with self._client_lock:
            if self._client is not None and self._client is not stale:
                return self._client
            if self._client is not None:
                retired, self._client = self._client, None
                if self._client_users[retired] > 0:
                    self._retired.add(retired)  # closed by the last order still using it
                else:
                    self._client_users.pop(retired, None)
                    await retired.close()
            issuer = self.issuer
            account = await self._store.get_account(issuer.directory)
            if account is None:
                key_pem = await asyncio.to_thread(generate_private_key)
                account = await self._store.save_account(issuer.directory, key_pem, None, issuer.email)
            account_url = None if stale is not None else account.url
            # Imported on first use: the ACME stack (acme, josepy, requests) is a third of
            # the server's start-up time and is not needed until something is ordered.
            from ._acme import AcmeClient

            client = AcmeClient(issuer.directory, account.key_pem, ca_bundle=issuer.ca_bundle, account_url=account_url,
                                trace_configs=self.trace_configs)
            try:
                if account_url is None:
                    url = await client.register(issuer.email, self.agree_tos, issuer.eab)
                    await self._store.save_account(issuer.directory, account.key_pem, url, issuer.email)
            except BaseException:
                await client.close()
                raise
            self._client = client
            return client

    async def has_renewal_info(self) -> bool:
        """Whether the CA publishes renewal information (ARI), read once from its directory."""
        if self._renewal_info is None:
            client = await self.acquire()
            try:
                self._renewal_info = "renewalInfo" in (await client.directory()).to_partial_json()
            finally:
                await self.release(client)
        return self._renewal_info
