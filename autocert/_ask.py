"""The ask endpoint (``--ask URL``): the application decides which names off the allowlist
may be served, with the same query as Caddy's on-demand TLS, so apps written for it work.

``GET URL?domain=NAME``: any 2xx allows the name, anything else refuses it, and so do a
timeout and a connection error. The gate sits in front of the endpoint so that a flood of
made-up names cannot become a flood of requests:

- answers are kept in memory (an LRU of ``cache_size`` names) for as long as the answer's
  ``Cache-Control: max-age`` says, else the defaults of :func:`autocert._policy.ask_answer`;
- concurrent asks for one name share one request;
- at most ``max_in_flight`` requests run at once; a name that would need one more is refused
  at once, without a task or a request, and without its refusal being remembered.

An allowed answer that has run out still serves while one request refreshes it; a name the
endpoint then refuses is dropped (``on_refused``) and stops being served. Nothing here touches
the database: a refused name leaves no trace.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable

import aiohttp
from yarl import URL

from ._config import ConfigError
from ._names import is_host_name
from ._policy import ask_answer

log = logging.getLogger("autocert.ask")

#: Defaults of ``--ask-timeout`` and of the bounds, for the CLI and the ``Manager`` alike.
ASK_TIMEOUT = 2.0
ASK_IN_FLIGHT = 64
ASK_CACHE_SIZE = 100_000


def parse_ask_url(value: str) -> URL:
    """``--ask``: an absolute http(s) URL, checked at start rather than at the first handshake."""
    try:
        url = URL(value)
    except (ValueError, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"--ask {value!r}: not an http:// or https:// URL")
    return url


class AskGate:
    """Asks one endpoint about names, remembers the answers, and keeps the endpoint safe.

    ``answer`` is called on the handshake path and answers from memory; ``ask`` does the I/O.
    ``outcomes`` counts what the asks came to (``allowed``, ``refused``, ``failed``,
    ``flood``) and ``requests`` how many requests reached the endpoint.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = ASK_TIMEOUT,
        max_in_flight: int = ASK_IN_FLIGHT,
        cache_size: int = ASK_CACHE_SIZE,
        on_refused: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = parse_ask_url(url)
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.cache_size = cache_size
        self._on_refused = on_refused
        self._clock = clock
        #: name -> (clock time the answer runs out, allowed), least recently used first.
        self._answers: collections.OrderedDict[str, tuple[float, bool]] = collections.OrderedDict()
        self._asking: dict[str, asyncio.Task[bool]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.requests = 0

    async def close(self) -> None:
        tasks = list(self._asking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def answer(self, name: str) -> bool | None:
        """From memory: whether ``name`` may be served, or None when the endpoint must be
        asked first. A name the endpoint could not be asked about now (too many asks in
        flight) is refused at once."""
        entry = self._answers.get(name)
        if entry is not None:
            expires, allowed = entry
            if expires > self._clock():
                self._answers.move_to_end(name)
                return allowed
            if allowed:
                self.ask_soon(name)  # served meanwhile: the endpoint allowed it a moment ago
                return True
        if name in self._asking:
            return None
        if len(self._asking) >= self.max_in_flight:
            self.outcomes["flood"] += 1
            return False
        if not is_host_name(name):  # never ask about a name no certificate could carry
            self.outcomes["refused"] += 1
            return False
        return None

    def allows(self, name: str) -> bool:
        """Whether the last answer for ``name`` allowed it, however old (no I/O, no refresh)."""
        entry = self._answers.get(name)
        return entry is not None and entry[1]

    def ask_soon(self, name: str) -> None:
        """Ask in the background (the embedded ``sni_callback`` cannot wait for it)."""
        self._request(name)

    async def ask(self, name: str, *, fresh: bool = False) -> bool:
        """Whether the endpoint allows ``name``: from memory unless ``fresh``, else asked
        (or joined to the ask already running for it)."""
        if not fresh:
            known = self.answer(name)
            if known is not None:
                return known
        task = self._request(name)
        return False if task is None else await asyncio.shield(task)

    def _request(self, name: str) -> asyncio.Task[bool] | None:
        task = self._asking.get(name)
        if task is None:
            if len(self._asking) >= self.max_in_flight or not is_host_name(name):
                self.outcomes["flood" if is_host_name(name) else "refused"] += 1
                return None
            task = asyncio.get_running_loop().create_task(self._ask(name), name=f"autocert-ask-{name}")
            self._asking[name] = task
            task.add_done_callback(functools.partial(self._forget, name))
        return task

    def _forget(self, name: str, task: asyncio.Task[bool]) -> None:
        if self._asking.get(name) is task:
            del self._asking[name]

    async def _ask(self, name: str) -> bool:
        status, cache_control = await self._get(name)
        allowed, seconds = ask_answer(status, cache_control)
        self.outcomes["allowed" if allowed else "refused" if status is not None else "failed"] += 1
        was_allowed = self.allows(name)
        self._answers.pop(name, None)
        self._answers[name] = (self._clock() + seconds, allowed)
        while len(self._answers) > self.cache_size:
            self._answers.popitem(last=False)
        if was_allowed and not allowed:
            log.info("%s: the ask endpoint no longer allows it; stopped serving it", name)
            if self._on_refused is not None:
                self._on_refused(name)
        return allowed

    async def _get(self, name: str) -> tuple[int | None, str | None]:
        """The endpoint's status and Cache-Control for ``name``; (None, None) when it gave none."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self.requests += 1
        try:
            async with self._session.get(self.url.update_query(domain=name), allow_redirects=False) as response:
                return response.status, response.headers.get("Cache-Control")
        except TimeoutError:
            log.warning("%s: the ask endpoint did not answer within %.1f s; refused", name, self.timeout)
        except aiohttp.ClientError as exc:
            log.warning("%s: could not ask the ask endpoint (%s); refused", name, exc)
        return None, None
