"""A small asynchronous ACME (RFC 8555) client.

Why not certbot's ``acme.client.ClientV2``: it is synchronous, sleeps a fixed second between
polls (which alone makes first contact take seconds), retries ``badNonce`` only once, cannot
send an order's ``replaces`` (RFC 9773) and has no tls-alpn-01. Against a fast CA the polling
cadence decides the latency of a first handshake, so this client polls from tens of
milliseconds upwards and honours ``Retry-After`` instead.

The wire format still comes from ``acme.messages`` and ``josepy`` (JWS signing); only transport,
retries and the order flow are ours. Challenges are handled generically (type string + token)
so that types the installed ``acme`` does not know, such as tls-alpn-01, work as well.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Protocol, TypeVar
from urllib.parse import urljoin

import aiohttp
import josepy as jose
from acme import jws, messages
from cryptography.hazmat.primitives import hashes
from multidict import CIMultiDictProxy

from autocert._version import __version__
from autocert._crypto import CertificateInfo, leaf_certificate_der, make_csr, parse_certificate_chain
from autocert._errors import PROBLEM_ACCOUNT_DOES_NOT_EXIST, PROBLEM_ALREADY_REPLACED, PROBLEM_BAD_NONCE, AcmeError

__all__ = ["AcmeClient", "ChallengeResponder", "IssuedCertificate", "RenewalInfo"]

log = logging.getLogger("autocert.acme_client")


_JOSE_JSON = "application/jose+json"
_PEM_CHAIN = "application/pem-certificate-chain"
# Enough to absorb a burst of concurrent requests without holding stale nonces forever.
_NONCE_POOL_SIZE = 32
# 429/503 answers: retry a few times when the server says when, and give up (raise) when it asks
# for longer than a request should reasonably block; the caller's backoff takes it from there.
_BUSY_RETRIES = 3
_BUSY_WAIT_MAX = 60.0
_BACKOFF = 1.5

_T = TypeVar("_T", bound=jose.JSONDeSerializable)


class ChallengeResponder(Protocol):
    """Something that can make a challenge answer visible to the CA's validator.

    ``present`` must return only once the answer is served; ``cleanup`` is always called
    afterwards, whatever the outcome.
    """

    # A read-only property so that implementations may declare it as a tuple class attribute.
    @property
    def challenge_types(self) -> Sequence[str]:
        """Challenge types this responder can answer, in order of preference."""
        ...

    async def present(self, name: str, challenge_type: str, token: str, key_authorization: str) -> None: ...

    async def cleanup(self, name: str, challenge_type: str, token: str) -> None: ...


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate as the CA delivered it, with its order and a parsed summary."""

    chain_pem: bytes
    order_url: str
    info: CertificateInfo


@dataclass(frozen=True)
class _Response:
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

    @property
    def location(self) -> str:
        value = self.headers.get("Location")
        if not value:
            raise AcmeError(f"{self.method} {self.url}: response has no Location header", status=self.status)
        return urljoin(self.url, value)

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("Retry-After"))


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


@dataclass(frozen=True)
class RenewalInfo:
    """A CA's renewal information for one certificate (RFC 9773)."""

    start: datetime
    end: datetime
    retry_after: float | None
    explanation_url: str | None




class AcmeClient:
    """One ACME account at one CA.

    Create it inside the event loop that uses it (the HTTP session is bound to that loop) and
    close it when done, e.g. ``async with AcmeClient(...) as client``. Concurrent calls are
    fine: they share the connection pool and the nonce pool.
    """

    def __init__(
        self,
        directory_url: str,
        account_key_pem: bytes,
        *,
        ca_bundle: str | None = None,
        account_url: str | None = None,
        bad_nonce_retries: int = 20,
        poll_initial: float = 0.02,
        poll_max: float = 2.0,
        poll_timeout: float = 120.0,
        request_timeout: float = 30.0,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        self.directory_url = directory_url
        self._key = jose.JWK.load(account_key_pem)
        self._alg = _signature_algorithm(self._key)
        self._thumbprint = jose.b64encode(self._key.public_key().thumbprint(hash_function=hashes.SHA256)).decode()
        self._ca_bundle = ca_bundle
        self._account_url = account_url
        self._bad_nonce_retries = bad_nonce_retries
        self._poll_initial = poll_initial
        self._poll_max = poll_max
        self._poll_timeout = poll_timeout
        self._request_timeout = request_timeout
        self._nonces: collections.deque[str] = collections.deque(maxlen=_NONCE_POOL_SIZE)
        self._directory: messages.Directory | None = None
        self._directory_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        # Request hooks from the caller (e.g. latency metrics); the client itself stays generic.
        self._trace_configs = trace_configs

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> AcmeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    @property
    def account_url(self) -> str | None:
        return self._account_url

    def key_authorization(self, token: str) -> str:
        """``token.thumbprint`` (RFC 8555 section 8.1), the value every challenge proves."""
        return f"{token}.{self._thumbprint}"

    # -- directory and account -------------------------------------------------------------

    async def directory(self) -> messages.Directory:
        """The CA's directory, fetched once: its URLs do not change while we run."""
        if self._directory is not None:
            return self._directory
        async with self._directory_lock:
            if self._directory is None:
                resp = await self._send("GET", self.directory_url)
                if resp.status != 200:
                    raise self._response_error(resp)
                try:
                    self._directory = messages.Directory.from_json(resp.json())
                except (jose.DeserializationError, TypeError) as exc:
                    raise AcmeError(f"malformed ACME directory at {self.directory_url}: {exc}") from exc
        return self._directory

    async def _resource(self, name: str) -> str:
        directory = await self.directory()
        try:
            url = directory[name]
        except KeyError:
            raise AcmeError(f"the ACME directory at {self.directory_url} has no {name!r}") from None
        if not isinstance(url, str):
            raise AcmeError(f"the ACME directory at {self.directory_url} has a bad {name!r}")
        return url

    async def register(self, email: str | None, agree_tos: bool) -> str:
        """Create the account for our key, or find the existing one; returns the account URL.

        The CA answers 200 and the existing account's Location when the key is known, so this is
        safe to call at every start.
        """
        directory = await self.directory()
        url = await self._resource("newAccount")
        tos = directory.meta.terms_of_service
        if tos and not agree_tos:
            existing = await self._find_account(url)
            if existing is not None:
                return existing
            raise AcmeError(
                f"the CA requires agreeing to its terms of service ({tos}); "
                "set agree_tos after reading them"
            )
        payload: dict[str, Any] = {}
        if email:
            payload["contact"] = [f"mailto:{email}"]
        if agree_tos:
            payload["termsOfServiceAgreed"] = True
        resp = await self._post(url, payload, use_kid=False)
        self._account_url = resp.location
        log.debug("account %s (%s)", self._account_url, "existing" if resp.status == 200 else "new")
        return self._account_url

    async def _find_account(self, new_account_url: str) -> str | None:
        try:
            resp = await self._post(new_account_url, {"onlyReturnExisting": True}, use_kid=False)
        except AcmeError as exc:
            if exc.problem_type == PROBLEM_ACCOUNT_DOES_NOT_EXIST:
                return None
            raise
        self._account_url = resp.location
        return self._account_url

    # -- orders ----------------------------------------------------------------------------

    async def new_order(
        self, names: Sequence[str], *, profile: str | None = None, replaces: str | None = None
    ) -> tuple[str, messages.Order]:
        """Place an order; returns (order URL, order).

        The payload is built by hand because ``acme.messages.NewOrder`` has no ``replaces``.
        """
        if isinstance(names, str):
            raise TypeError("names must be a sequence of names, not a single string")
        unique = list(dict.fromkeys(names))
        if not unique:
            raise ValueError("an order needs at least one name")
        directory = await self.directory()
        url = await self._resource("newOrder")
        payload: dict[str, Any] = {"identifiers": [{"type": "dns", "value": n} for n in unique]}
        if profile is not None:
            offered = directory.meta.profiles or {}
            if profile not in offered:
                choices = ", ".join(sorted(offered)) or "none"
                raise AcmeError(
                    f"the CA at {self.directory_url} does not offer the profile {profile!r} "
                    f"(offered: {choices})"
                )
            payload["profile"] = profile
        if replaces is not None:
            # RFC 9773 section 5: only send it to a CA that implements renewal information.
            if "renewalInfo" in directory.to_partial_json():
                payload["replaces"] = replaces
            else:
                log.debug("not sending replaces=%s: the directory has no renewalInfo", replaces)
        resp = await self._post(url, payload)
        order_url = resp.location
        order = self._decode(messages.Order, resp)
        log.debug("order %s for %s: %s", order_url, ", ".join(unique), order.status)
        return order_url, order

    async def get_order(self, url: str) -> messages.Order:
        return self._decode(messages.Order, await self._post(url, None))

    async def authorize(self, authz_url: str, responder: ChallengeResponder) -> None:
        """Get one authorization to ``valid``: present, trigger, poll, and always clean up."""
        raw = (await self._post(authz_url, None)).json()
        name = _identifier(raw)
        status = raw.get("status")
        if status == "valid":
            log.debug("authorization for %s already valid", name)
            return
        if status != "pending":
            raise _authorization_error(raw, name, None)
        challenge = _choose_challenge(raw, responder.challenge_types, name)
        ctype, token, challenge_url = challenge["type"], challenge["token"], challenge["url"]
        key_authorization = self.key_authorization(token)
        started = time.monotonic()
        try:
            await responder.present(name, ctype, token, key_authorization)
            resp = await self._post(challenge_url, {})
            # A CA that validated synchronously has settled the challenge already: look now.
            try:
                settled = resp.json().get("status") in ("valid", "invalid")
            except AcmeError:
                settled = False
            raw = await self._poll(
                authz_url,
                lambda d: d.get("status") != "pending",
                f"authorization of {name}",
                first_wait=0.0 if settled else self._first_wait(resp),
            )
        finally:
            try:
                await responder.cleanup(name, ctype, token)
            except Exception:
                log.warning("cleaning up the %s answer for %s failed", ctype, name, exc_info=True)
        log.debug("authorization for %s via %s: %s in %.3fs", name, ctype, raw.get("status"),
                  time.monotonic() - started)
        if raw.get("status") != "valid":
            raise _authorization_error(raw, name, ctype)

    async def finalize(self, order_url: str, order: messages.Order, csr_der: bytes) -> messages.Order:
        """Submit the CSR and wait until the order is ``valid``; raises if it turns ``invalid``."""
        if _status(order) == "pending":
            # Its authorizations are normally valid by now, so look at once; the CA may still lag.
            raw = await self._poll(
                order_url, lambda d: d.get("status") != "pending", "order to become ready", first_wait=0.0
            )
            order = self._decode_json(messages.Order, raw, order_url)
        first_wait: float | None = None
        if _status(order) == "ready":
            resp = await self._post(order.finalize, {"csr": jose.encode_b64jose(csr_der)})
            order = self._decode(messages.Order, resp)
            first_wait = self._first_wait(resp)
        if _status(order) in ("ready", "processing"):
            raw = await self._poll(
                order_url,
                lambda d: d.get("status") not in ("ready", "processing"),
                "certificate issuance",
                first_wait=first_wait,
            )
            order = self._decode_json(messages.Order, raw, order_url)
        if _status(order) != "valid":
            if order.error is not None:
                raise problem_error(order.error.to_json(), context=f"order {order_url} is {_status(order)}")
            raise AcmeError(f"order {order_url} is {_status(order)}")
        if not order.certificate:
            raise AcmeError(f"order {order_url} is valid but has no certificate URL")
        return order

    async def download(self, certificate_url: str) -> bytes:
        """The certificate chain (leaf first) as PEM."""
        resp = await self._post(certificate_url, None, accept=_PEM_CHAIN)
        if b"-----BEGIN CERTIFICATE-----" not in resp.body:
            raise AcmeError(f"{certificate_url} did not return a PEM certificate chain", status=resp.status)
        return resp.body

    async def revoke(self, cert_pem: bytes, reason: int = 0) -> None:
        """Revoke with the account key; ``reason`` is an RFC 5280 CRLReason code."""
        url = await self._resource("revokeCert")
        der = leaf_certificate_der(cert_pem)
        await self._post(url, {"certificate": jose.encode_b64jose(der), "reason": reason})
        log.debug("revoked certificate (reason %d)", reason)

    async def renewal_info(self, certificate_id: str) -> RenewalInfo | None:
        """The CA's suggested renewal window (RFC 9773), or None when it offers none."""
        directory = await self.directory()
        base = directory.to_partial_json().get("renewalInfo")
        if not isinstance(base, str):
            return None
        resp = await self._send("GET", f"{base.rstrip('/')}/{certificate_id}")
        if resp.status != 200:
            raise self._response_error(resp)
        try:
            body = resp.json()
            window = body["suggestedWindow"]
            start = datetime.fromisoformat(str(window["start"]).replace("Z", "+00:00"))
            end = datetime.fromisoformat(str(window["end"]).replace("Z", "+00:00"))
        except (KeyError, TypeError, ValueError) as exc:
            raise AcmeError(f"malformed renewal information from {resp.url}: {exc}") from exc
        if start.tzinfo is None or end.tzinfo is None or end < start:
            raise AcmeError(f"unusable renewal window from {resp.url}: {window!r}")
        explanation = body.get("explanationURL")
        return RenewalInfo(start=start, end=end, retry_after=resp.retry_after,
                           explanation_url=explanation if isinstance(explanation, str) else None)

    async def issue(
        self,
        names: Sequence[str],
        key_pem: bytes,
        responder: ChallengeResponder,
        *,
        profile: str | None = None,
        replaces: str | None = None,
        resume_url: str | None = None,
        on_order: Callable[[str], Awaitable[None]] | None = None,
    ) -> IssuedCertificate:
        """The whole flow: order, authorize every name concurrently, finalize, download.

        ``replaces`` (an ARI certificate id) marks the order as a renewal. A CA that refuses
        it (409: already replaced, or not replaceable) gets a plain order instead, so a
        renewal never fails over bookkeeping.

        ``resume_url`` continues an order an earlier process placed with the same key (if
        the CA still has it alive); ``on_order`` is awaited with a new order's URL before any
        challenge is answered, so the caller can store it for such a resumption.
        """
        started = time.monotonic()
        csr = make_csr(key_pem, names)
        resumed = await self._resumable_order(resume_url) if resume_url else None
        if resumed is not None:
            order_url, order = resume_url, resumed  # type: ignore[assignment]
            log.info("resuming order %s (%s)", order_url, _status(order))
        else:
            order_url, order = await self._new_order_for_renewal(names, profile=profile, replaces=replaces)
            if on_order is not None:
                await on_order(order_url)
        tasks = [asyncio.ensure_future(self.authorize(u, responder)) for u in order.authorizations]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # One failure settles the order; stop the others so their answers get cleaned up now.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        order = await self.finalize(order_url, order, csr)
        assert order.certificate is not None  # finalize() guarantees it
        chain = await self.download(order.certificate)
        try:
            info = parse_certificate_chain(chain)
        except ValueError as exc:
            raise AcmeError(f"the CA returned an unreadable certificate: {exc}") from exc
        log.debug("issued %s for %s in %.3fs", info.serial, ", ".join(names), time.monotonic() - started)
        return IssuedCertificate(chain_pem=chain, order_url=order_url, info=info)

    async def _resumable_order(self, order_url: str) -> messages.Order | None:
        try:
            order = await self.get_order(order_url)
        except AcmeError as exc:
            log.info("cannot resume order %s: %s", order_url, exc)
            return None
        if _status(order) in ("pending", "ready", "processing", "valid"):
            return order
        log.info("order %s is %s; placing a new one", order_url, _status(order))
        return None

    async def _new_order_for_renewal(
        self, names: Sequence[str], *, profile: str | None, replaces: str | None
    ) -> tuple[str, messages.Order]:
        try:
            return await self.new_order(names, profile=profile, replaces=replaces)
        except AcmeError as exc:
            if replaces is None or not (exc.status == 409 or exc.problem_type == PROBLEM_ALREADY_REPLACED):
                raise
            log.warning("the CA refused replaces=%s (%s); placing a plain order", replaces, exc)
            return await self.new_order(names, profile=profile)

    # -- transport -------------------------------------------------------------------------

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

    async def _send(
        self, method: str, url: str, *, data: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> _Response:
        try:
            async with self._http().request(method, url, data=data, headers=headers) as r:
                body = await r.read()
                response = _Response(method, url, r.status, r.headers, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AcmeError(f"{method} {url} failed: {exc or type(exc).__name__}") from exc
        nonce = response.headers.get("Replay-Nonce")
        if nonce:
            self._nonces.append(nonce)
        log.debug("%s %s -> %d", method, url, response.status)
        return response

    async def _nonce(self) -> str:
        if self._nonces:
            return self._nonces.pop()
        resp = await self._send("HEAD", await self._resource("newNonce"))
        if resp.status >= 400:
            raise self._response_error(resp)
        if not self._nonces:
            raise AcmeError("the CA's newNonce answered without a Replay-Nonce", status=resp.status)
        return self._nonces.pop()

    def _sign(self, payload: bytes, nonce: str, url: str, use_kid: bool) -> bytes:
        kid = None
        if use_kid:
            if self._account_url is None:
                raise AcmeError("no ACME account yet: call register() first")
            kid = self._account_url
        try:
            nonce_bytes = jose.decode_b64jose(nonce)
        except jose.DeserializationError as exc:
            raise AcmeError(f"the CA sent a malformed nonce {nonce!r}") from exc
        signed = jws.JWS.sign(payload, key=self._key, alg=self._alg, nonce=nonce_bytes, url=url, kid=kid)
        return str(signed.json_dumps()).encode()

    async def _post(
        self, url: str, payload: Mapping[str, Any] | None, *, use_kid: bool = True, accept: str | None = None
    ) -> _Response:
        """Signed POST (``payload=None`` is POST-as-GET), retrying badNonce and short 429/503 waits."""
        body = b"" if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": _JOSE_JSON}
        if accept:
            headers["Accept"] = accept
        bad_nonces = busy = 0
        while True:
            data = self._sign(body, await self._nonce(), url, use_kid)
            resp = await self._send("POST", url, data=data, headers=headers)
            if resp.status < 400:
                return resp
            error = self._response_error(resp)
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

    def _response_error(self, resp: _Response) -> AcmeError:
        context = f"{resp.method} {resp.url}"
        try:
            problem = json.loads(resp.body)
        except ValueError:
            problem = None
        if isinstance(problem, dict) and ("type" in problem or "detail" in problem):
            return problem_error(problem, status=resp.status, context=context)
        snippet = resp.body[:200].decode(errors="replace").strip()
        return AcmeError(f"{context}: HTTP {resp.status} {snippet}".rstrip(), status=resp.status)

    async def _poll(
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
            resp = await self._post(url, None)
            data = resp.json()
            if done(data):
                return data
            if loop.time() >= deadline:
                raise AcmeError(
                    f"timed out after {self._poll_timeout:g}s waiting for {what} (status {data.get('status')})"
                )
            delay = min(delay * _BACKOFF, self._poll_max)
            wait = max(delay, resp.retry_after or 0.0)

    def _first_wait(self, resp: _Response) -> float:
        return max(self._poll_initial, resp.retry_after or 0.0)

    def _decode(self, cls: type[_T], resp: _Response) -> _T:
        return self._decode_json(cls, resp.json(), resp.url)

    @staticmethod
    def _decode_json(cls: type[_T], data: dict[str, Any], url: str) -> _T:
        try:
            return cls.from_json(data)
        except (jose.DeserializationError, TypeError, ValueError) as exc:
            raise AcmeError(f"malformed {cls.__name__} from {url}: {exc}") from exc


def _status(order: messages.Order) -> str | None:
    return order.status.name if order.status is not None else None


def _identifier(authz: Mapping[str, Any]) -> str:
    ident = authz.get("identifier")
    if not isinstance(ident, Mapping) or not isinstance(ident.get("value"), str):
        raise AcmeError("authorization without an identifier")
    return str(ident["value"])


def _choose_challenge(authz: Mapping[str, Any], preferred: Sequence[str], name: str) -> Mapping[str, Any]:
    offered = [c for c in authz.get("challenges") or () if isinstance(c, Mapping)]
    by_type = {c.get("type"): c for c in offered}
    for ctype in preferred:
        challenge = by_type.get(ctype)
        if challenge is not None:
            if not isinstance(challenge.get("token"), str) or not isinstance(challenge.get("url"), str):
                raise AcmeError(f"malformed {ctype} challenge for {name}")
            return challenge
    raise AcmeError(
        f"no usable challenge for {name}: the CA offers {', '.join(map(str, by_type)) or 'none'}, "
        f"we answer {', '.join(preferred) or 'none'}"
    )


def _authorization_error(authz: Mapping[str, Any], name: str, ctype: str | None) -> AcmeError:
    """The problem behind an authorization that did not become valid: the challenge's error."""
    status = authz.get("status")
    failed = [
        c for c in authz.get("challenges") or ()
        if isinstance(c, Mapping) and isinstance(c.get("error"), Mapping)
    ]
    failed.sort(key=lambda c: c.get("type") != ctype)  # the one we tried first
    context = f"authorization for {name} is {status}"
    if failed:
        challenge = failed[0]
        return problem_error(challenge["error"], context=f"{context} ({challenge.get('type')})")
    return AcmeError(context)
