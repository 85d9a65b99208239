"""The ACME order flow: account, order, authorizations, finalize, download, revoke, ARI.

Built on ``AcmeTransport`` (``transport.py``), which does the signing, retries and polling.
Challenges are handled generically (type string + token) so that types the installed ``acme``
does not know, such as tls-alpn-01, work as well.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol

import aiohttp
import josepy as jose
from acme import messages

from autocert._crypto import CertificateInfo, leaf_certificate_der, make_csr, parse_certificate_chain
from autocert._config import ExternalAccount
from autocert._errors import (
    PROBLEM_ACCOUNT_DOES_NOT_EXIST,
    PROBLEM_ALREADY_REPLACED,
    PROBLEM_EXTERNAL_ACCOUNT_REQUIRED,
    PROBLEM_MALFORMED,
    PROBLEM_UNAUTHORIZED,
    AcmeError,
)
from autocert._names import is_address
from autocert._policy import order_profile

from .transport import AcmeTransport, decode_json, problem_error

__all__ = ["AcmeClient", "ChallengeResponder", "IssuedCertificate", "RenewalInfo"]

log = logging.getLogger("autocert.acme_client")


_PEM_CHAIN = "application/pem-certificate-chain"

#: How a missing External Account Binding is reported, naming the settings that provide it.
EAB_REQUIRED = "requires External Account Binding: set --eab-kid and --eab-hmac-key (the key id and MAC key the CA gave you)"


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
    profile: str | None = None
    """The profile the order asked for (None: the CA's default)."""


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
        self._transport = AcmeTransport(
            directory_url,
            account_key_pem,
            ca_bundle=ca_bundle,
            account_url=account_url,
            bad_nonce_retries=bad_nonce_retries,
            poll_initial=poll_initial,
            poll_max=poll_max,
            poll_timeout=poll_timeout,
            request_timeout=request_timeout,
            trace_configs=trace_configs,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> AcmeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    @property
    def directory_url(self) -> str:
        return self._transport.directory_url

    @property
    def account_url(self) -> str | None:
        return self._transport.account_url

    def key_authorization(self, token: str) -> str:
        """``token.thumbprint`` (RFC 8555 section 8.1), the value every challenge proves."""
        return f"{token}.{self._transport.thumbprint}"

    # -- directory and account -------------------------------------------------------------

    async def directory(self) -> messages.Directory:
        """The CA's directory, fetched once: its URLs do not change while we run."""
        return await self._transport.directory()

    async def register(self, email: str | None, agree_tos: bool, eab: ExternalAccount | None = None) -> str:
        """Create the account for our key, or find the existing one; returns the account URL.

        The CA answers 200 and the existing account's Location when the key is known, so this is
        safe to call at every start. ``eab`` binds the new account to one the CA issued out of
        band (RFC 8555 section 7.3.4), for CAs that require it.
        """
        directory = await self.directory()
        url = await self._transport.resource("newAccount")
        if eab is None and directory.meta.external_account_required:
            raise AcmeError(f"the CA at {self.directory_url} {EAB_REQUIRED}")
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
        if eab is not None:
            payload["externalAccountBinding"] = self._transport.external_account_binding(eab, directory)
        try:
            resp = await self._transport.post(url, payload, use_kid=False)
        except AcmeError as exc:
            raise _account_error(exc, eab) from exc
        self._transport.account_url = account_url = resp.location
        log.debug("account %s (%s)", account_url, "existing" if resp.status == 200 else "new")
        return account_url

    async def _find_account(self, new_account_url: str) -> str | None:
        try:
            resp = await self._transport.post(new_account_url, {"onlyReturnExisting": True}, use_kid=False)
        except AcmeError as exc:
            if exc.problem_type == PROBLEM_ACCOUNT_DOES_NOT_EXIST:
                return None
            raise
        self._transport.account_url = account_url = resp.location
        return account_url

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
        url = await self._transport.resource("newOrder")
        payload: dict[str, Any] = {"identifiers": [_identifier_json(n) for n in unique]}
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
        resp = await self._transport.post(url, payload)
        order_url = resp.location
        order = resp.decode(messages.Order)
        log.debug("order %s for %s: %s", order_url, ", ".join(unique), order.status)
        return order_url, order

    async def get_order(self, url: str) -> messages.Order:
        return (await self._transport.post(url, None)).decode(messages.Order)

    async def authorize(self, authz_url: str, responder: ChallengeResponder) -> None:
        """Get one authorization to ``valid``: present, trigger, poll, and always clean up."""
        transport = self._transport
        raw = (await transport.post(authz_url, None)).json()
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
            resp = await transport.post(challenge_url, {})
            # A CA that validated synchronously has settled the challenge already: look now.
            try:
                settled = resp.json().get("status") in ("valid", "invalid")
            except AcmeError:
                settled = False
            raw = await transport.poll(
                authz_url,
                lambda d: d.get("status") != "pending",
                f"authorization of {name}",
                first_wait=0.0 if settled else transport.first_wait(resp),
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
        transport = self._transport
        if _status(order) == "pending":
            # Its authorizations are normally valid by now, so look at once; the CA may still lag.
            raw = await transport.poll(
                order_url, lambda d: d.get("status") != "pending", "order to become ready", first_wait=0.0
            )
            order = decode_json(messages.Order, raw, order_url)
        first_wait: float | None = None
        if _status(order) == "ready":
            resp = await transport.post(order.finalize, {"csr": jose.encode_b64jose(csr_der)})
            order = resp.decode(messages.Order)
            first_wait = transport.first_wait(resp)
        if _status(order) in ("ready", "processing"):
            raw = await transport.poll(
                order_url,
                lambda d: d.get("status") not in ("ready", "processing"),
                "certificate issuance",
                first_wait=first_wait,
            )
            order = decode_json(messages.Order, raw, order_url)
        if _status(order) != "valid":
            if order.error is not None:
                raise problem_error(order.error.to_json(), context=f"order {order_url} is {_status(order)}")
            raise AcmeError(f"order {order_url} is {_status(order)}")
        if not order.certificate:
            raise AcmeError(f"order {order_url} is valid but has no certificate URL")
        return order

    async def download(self, certificate_url: str) -> bytes:
        """The certificate chain (leaf first) as PEM."""
        resp = await self._transport.post(certificate_url, None, accept=_PEM_CHAIN)
        if b"-----BEGIN CERTIFICATE-----" not in resp.body:
            raise AcmeError(f"{certificate_url} did not return a PEM certificate chain", status=resp.status)
        return resp.body

    async def revoke(self, cert_pem: bytes, reason: int = 0) -> None:
        """Revoke with the account key; ``reason`` is an RFC 5280 CRLReason code."""
        url = await self._transport.resource("revokeCert")
        der = leaf_certificate_der(cert_pem)
        await self._transport.post(url, {"certificate": jose.encode_b64jose(der), "reason": reason})
        log.debug("revoked certificate (reason %d)", reason)

    async def renewal_info(self, certificate_id: str) -> RenewalInfo | None:
        """The CA's suggested renewal window (RFC 9773), or None when it offers none."""
        directory = await self.directory()
        base = directory.to_partial_json().get("renewalInfo")
        if not isinstance(base, str):
            return None
        resp = await self._transport.get(f"{base.rstrip('/')}/{certificate_id}")
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
        profile = order_profile(profile, names, (await self.directory()).meta.profiles or {})
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
        return IssuedCertificate(chain_pem=chain, order_url=order_url, info=info, profile=profile)

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


def _status(order: messages.Order) -> str | None:
    return order.status.name if order.status is not None else None


def _identifier_json(name: str) -> dict[str, str]:
    """An order's identifier for a normalised name: ``ip`` for an address (RFC 8738)."""
    kind = messages.IDENTIFIER_IP if is_address(name) else messages.IDENTIFIER_FQDN
    return {"type": kind.name, "value": name}


def _identifier(authz: Mapping[str, Any]) -> str:
    ident = authz.get("identifier")
    if not isinstance(ident, Mapping) or not isinstance(ident.get("value"), str):
        raise AcmeError("authorization without an identifier")
    return str(ident["value"])


def _choose_challenge(authz: Mapping[str, Any], preferred: Sequence[str], name: str) -> Mapping[str, Any]:
    """Our most preferred type among those offered. CAs add new types (``dns-persist-01``)
    whose objects may lack a token or carry other fields: a type we do not answer is never
    looked into, only named if nothing else is usable."""
    offered = [c for c in authz.get("challenges") or () if isinstance(c, Mapping) and isinstance(c.get("type"), str)]
    by_type = {c["type"]: c for c in offered}
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


def _account_error(exc: AcmeError, eab: ExternalAccount | None) -> AcmeError:
    """A refused registration, said in terms of the options when External Account Binding is
    what the CA wants: the raw problem (``externalAccountRequired``, ``unauthorized``) does not
    tell an operator which setting to change."""
    if exc.problem_type == PROBLEM_EXTERNAL_ACCOUNT_REQUIRED:
        return AcmeError(f"the CA {EAB_REQUIRED} ({exc.detail})", problem_type=exc.problem_type, status=exc.status)
    if eab is not None and exc.problem_type in (PROBLEM_UNAUTHORIZED, PROBLEM_MALFORMED):
        return AcmeError(f"the CA refused the External Account Binding for key id {eab.kid!r}: check --eab-kid and "
                         f"--eab-hmac-key ({exc.detail})", problem_type=exc.problem_type, status=exc.status)
    return exc


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
