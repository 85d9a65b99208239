"""RFC 8555 over HTTP: the session, the directory, nonces, JWS signing, retries and polling.

Everything below the order flow lives here: one ``AcmeTransport`` per account key holds the
aiohttp session, the CA's directory and the nonce pool. Signed POSTs retry ``badNonce`` and
short 429/503 waits (``Retry-After``); an error answer becomes an ``AcmeError`` that keeps the
CA's problem type. Polling starts at tens of milliseconds and never looks sooner than the CA
asked.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import urljoin

import aiohttp
import josepy as jose
from acme import jws, messages
from cryptography.hazmat.primitives import hashes
from multidict import CIMultiDictProxy

from autocert._config import ExternalAccount
from autocert._version import __version__
from autocert._errors import PROBLEM_BAD_NONCE, AcmeError

__all__ = ["AcmeTransport", "Response", "parse_retry_after", "problem_error"]

log = logging.getLogger("autocert.acme_client")


_JOSE_JSON = "application/jose+json"
# Enough to absorb a burst of concurrent requests without holding stale nonces forever.
_NONCE_POOL_SIZE = 32
# 429/503 answers: retry a few times when the server says when, and give up (raise) when it asks
# for longer than a request should reasonably block; the caller's backoff takes it from there.
_BUSY_RETRIES = 3
_BUSY_WAIT_MAX = 60.0
_BACKOFF = 1.5

_T = TypeVar("_T", bound=jose.JSONDeSerializable)


@dataclass(frozen=True)
class Response:
    """One HTTP answer, read in full."""

    method: str
    url: str
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body)
        except ValueError as exc:
            raise AcmeError(
                f"{self.method} {self.url}: expected JSON, got {self.body[:200]!r}", status=self.status
            ) from exc
        if not isinstance(data, dict):
            raise AcmeError(f"{self.method} {self.url}: expected a JSON object", status=self.status)
        return data

    def decode(self, cls: type[_T]) -> _T:
        """The body as an ``acme.messages`` resource."""
        return decode_json(cls, self.json(), self.url)

    @property
    def location(self) -> str:
        value = self.headers.get("Location")
        if not value:
            raise AcmeError(f"{self.method} {self.url}: response has no Location header", status=self.status)
        return urljoin(self.url, value)

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("Retry-After"))


def decode_json(cls: type[_T], data: dict[str, Any], url: str) -> _T:
    """``data`` (fetched from ``url``) as an ``acme.messages`` resource; AcmeError if malformed."""
    try:
        return cls.from_json(data)
    except (jose.DeserializationError, TypeError, ValueError) as exc:
        raise AcmeError(f"malformed {cls.__name__} from {url}: {exc}") from exc


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or HTTP date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def problem_error(problem: Mapping[str, Any], *, status: int | None = None, context: str = "") -> AcmeError:
    """An AcmeError from an RFC 7807 problem document, keeping the CA's problem type and detail."""
    try:
        err = messages.Error.from_json(dict(problem))
        typ: str | None = err.typ
        detail = err.detail or err.title or err.description or ""
        subs = [
            f"{s.identifier.value + ': ' if s.identifier else ''}{s.typ}: {s.detail or ''}".strip()
            for s in (err.subproblems or ())
        ]
    except (jose.DeserializationError, TypeError, AttributeError):
        typ = problem.get("type") if isinstance(problem.get("type"), str) else None
        detail = str(problem.get("detail") or "")
        subs = []
    if typ == "about:blank":
        typ = None
    parts = [p for p in (context, detail) if p]
    message = ": ".join(parts) or (f"HTTP {status}" if status else "ACME error")
    if subs:
        message += " (" + "; ".join(subs) + ")"
    return AcmeError(message, problem_type=typ, status=status)


def _signature_algorithm(key: jose.JWK) -> jose.JWASignature:
    if isinstance(key, jose.JWKRSA):
        return jose.RS256
    if isinstance(key, jose.JWKEC):
        curve = key.key.curve.name
        algs = {"secp256r1": jose.ES256, "secp384r1": jose.ES384, "secp521r1": jose.ES512}
        if curve in algs:
            return algs[curve]
        raise ValueError(f"unsupported account key curve {curve}")
    raise ValueError(f"unsupported account key type {type(key).__name__}")


class AcmeTransport:
    """Signed requests to one CA with one account key.

    ``account_url`` is the key id of signed requests; it stays None (and only requests that
    sign with the bare key work) until the account is known. Create it inside the event loop
    that uses it (the HTTP session is bound to that loop) and close it when done.
    """

    def __init__(
        self,
        directory_url: str,
        account_key_pem: bytes,
        *,
        ca_bundle: str | None,
        account_url: str | None,
        bad_nonce_retries: int,
        poll_initial: float,
        poll_max: float,
        poll_timeout: float,
        request_timeout: float,
        trace_configs: Sequence[aiohttp.TraceConfig],
    ) -> None:
        # No defaults here: AcmeClient's signature is the one place that sets them.
        self.directory_url = directory_url
        self.account_url = account_url
        self._key = jose.JWK.load(account_key_pem)
        self._alg = _signature_algorithm(self._key)
        self.thumbprint = jose.b64encode(self._key.public_key().thumbprint(hash_function=hashes.SHA256)).decode()
        self._ca_bundle = ca_bundle
        self._bad_nonce_retries = bad_nonce_retries
        self._poll_initial = poll_initial
        self._poll_max = poll_max
        self._poll_timeout = poll_timeout
        self._request_timeout = request_timeout
        self._nonces: collections.deque[str] = collections.deque(maxlen=_NONCE_POOL_SIZE)
        self._directory: messages.Directory | None = None
        self._directory_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        # Request hooks from the caller (e.g. latency metrics); the transport itself stays generic.
        self._trace_configs = trace_configs

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    # -- directory -------------------------------------------------------------------------

    async def directory(self) -> messages.Directory:
        """The CA's directory, fetched once: its URLs do not change while we run."""
        if self._directory is not None:
            return self._directory
        async with self._directory_lock:
            if self._directory is None:
                resp = await self.get(self.directory_url)
                try:
                    self._directory = messages.Directory.from_json(resp.json())
                except (jose.DeserializationError, TypeError) as exc:
                    raise AcmeError(f"malformed ACME directory at {self.directory_url}: {exc}") from exc
        return self._directory

    def external_account_binding(self, eab: ExternalAccount, directory: messages.Directory) -> dict[str, Any]:
        """The inner JWS that binds our account key to the CA's key id: our public key signed
        with the MAC key, for the newAccount URL."""
        return messages.ExternalAccountBinding.from_data(self._key.public_key(), eab.kid, eab.hmac_key, directory)

    async def resource(self, name: str) -> str:
        """The URL the directory gives for ``name`` (``newOrder``, ``revokeCert``, ...)."""
        directory = await self.directory()
        try:
            url = directory[name]
        except KeyError:
            raise AcmeError(f"the ACME directory at {self.directory_url} has no {name!r}") from None
        if not isinstance(url, str):
            raise AcmeError(f"the ACME directory at {self.directory_url} has a bad {name!r}")
        return url

    # -- requests --------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context = (
                ssl.create_default_context(cafile=self._ca_bundle)
                if self._ca_bundle
                else ssl.create_default_context()
            )
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                timeout=aiohttp.ClientTimeout(total=self._request_timeout),
                headers={"User-Agent": f"autocert/{__version__} aiohttp/{aiohttp.__version__}"},
                trace_configs=list(self._trace_configs) or None,
            )
        return self._session

    async def send(
        self, method: str, url: str, *, data: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Response:
        """One request as is; any answer's ``Replay-Nonce`` goes to the pool."""
        try:
            async with self._http().request(method, url, data=data, headers=headers) as r:
                body = await r.read()
                response = Response(method, url, r.status, r.headers, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AcmeError(f"{method} {url} failed: {exc or type(exc).__name__}") from exc
        nonce = response.headers.get("Replay-Nonce")
        if nonce:
            self._nonces.append(nonce)
        log.debug("%s %s -> %d", method, url, response.status)
        return response

    async def get(self, url: str) -> Response:
        """An unsigned GET that must answer 200."""
        resp = await self.send("GET", url)
        if resp.status != 200:
            raise self.response_error(resp)
        return resp

    async def _nonce(self) -> str:
        if self._nonces:
            return self._nonces.pop()
        resp = await self.send("HEAD", await self.resource("newNonce"))
        if resp.status >= 400:
            raise self.response_error(resp)
        if not self._nonces:
            raise AcmeError("the CA's newNonce answered without a Replay-Nonce", status=resp.status)
        return self._nonces.pop()

    def _sign(self, payload: bytes, nonce: str, url: str, use_kid: bool) -> bytes:
        kid = None
        if use_kid:
            if self.account_url is None:
                raise AcmeError("no ACME account yet: call register() first")
            kid = self.account_url
        try:
            nonce_bytes = jose.decode_b64jose(nonce)
        except jose.DeserializationError as exc:
            raise AcmeError(f"the CA sent a malformed nonce {nonce!r}") from exc
        signed = jws.JWS.sign(payload, key=self._key, alg=self._alg, nonce=nonce_bytes, url=url, kid=kid)
        return str(signed.json_dumps()).encode()

    async def post(
        self, url: str, payload: Mapping[str, Any] | None, *, use_kid: bool = True, accept: str | None = None
    ) -> Response:
        """Signed POST (``payload=None`` is POST-as-GET), retrying badNonce and short 429/503 waits."""
        body = b"" if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": _JOSE_JSON}
        if accept:
            headers["Accept"] = accept
        bad_nonces = busy = 0
        while True:
            data = self._sign(body, await self._nonce(), url, use_kid)
            resp = await self.send("POST", url, data=data, headers=headers)
            if resp.status < 400:
                return resp
            error = self.response_error(resp)
            if error.problem_type == PROBLEM_BAD_NONCE and bad_nonces < self._bad_nonce_retries:
                bad_nonces += 1
                log.debug("badNonce from %s, retry %d/%d", url, bad_nonces, self._bad_nonce_retries)
                continue
            wait = resp.retry_after
            if resp.status in (429, 503) and busy < _BUSY_RETRIES and wait is not None and wait <= _BUSY_WAIT_MAX:
                busy += 1
                log.debug("HTTP %d from %s, retrying in %.1fs as asked", resp.status, url, wait)
                await asyncio.sleep(wait)
                continue
            raise error

    @staticmethod
    def response_error(resp: Response) -> AcmeError:
        """The AcmeError for an error answer: its problem document, or the status and a snippet."""
        context = f"{resp.method} {resp.url}"
        try:
            problem = json.loads(resp.body)
        except ValueError:
            problem = None
        if isinstance(problem, dict) and ("type" in problem or "detail" in problem):
            error = problem_error(problem, status=resp.status, context=context)
        else:
            snippet = resp.body[:200].decode(errors="replace").strip()
            error = AcmeError(f"{context}: HTTP {resp.status} {snippet}".rstrip(), status=resp.status)
        error.retry_after = resp.retry_after
        return error

    # -- polling ---------------------------------------------------------------------------

    async def poll(
        self,
        url: str,
        done: Callable[[dict[str, Any]], bool],
        what: str,
        *,
        first_wait: float | None = None,
    ) -> dict[str, Any]:
        """POST-as-GET ``url`` until ``done``: backoff from poll_initial, never sooner than Retry-After.

        ``first_wait`` is the pause before the first look (default ``poll_initial``).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._poll_timeout
        delay = self._poll_initial
        wait = delay if first_wait is None else max(0.0, first_wait)
        while True:
            await asyncio.sleep(min(wait, max(0.0, deadline - loop.time())))
            resp = await self.post(url, None)
            data = resp.json()
            if done(data):
                return data
            if loop.time() >= deadline:
                raise AcmeError(
                    f"timed out after {self._poll_timeout:g}s waiting for {what} (status {data.get('status')})"
                )
            delay = min(delay * _BACKOFF, self._poll_max)
            wait = max(delay, resp.retry_after or 0.0)

    def first_wait(self, resp: Response) -> float:
        """The pause before polling what ``resp`` started: poll_initial, or longer if the CA asks."""
        return max(self._poll_initial, resp.retry_after or 0.0)
