"""Exception types shared by every layer.

They live at the bottom of the import graph so that the store, the ACME client and the
CLI can all raise and catch the same classes without importing each other.
"""

from __future__ import annotations


#: RFC 8555 problem types (``urn:ietf:params:acme:error:...``) that autocert acts on, named
#: once so the client and the worker compare against the same strings.
ACME_ERROR_PREFIX = "urn:ietf:params:acme:error:"
PROBLEM_BAD_NONCE = ACME_ERROR_PREFIX + "badNonce"
PROBLEM_ACCOUNT_DOES_NOT_EXIST = ACME_ERROR_PREFIX + "accountDoesNotExist"
PROBLEM_ALREADY_REPLACED = ACME_ERROR_PREFIX + "alreadyReplaced"
PROBLEM_ALREADY_REVOKED = ACME_ERROR_PREFIX + "alreadyRevoked"
PROBLEM_RATE_LIMITED = ACME_ERROR_PREFIX + "rateLimited"
PROBLEM_EXTERNAL_ACCOUNT_REQUIRED = ACME_ERROR_PREFIX + "externalAccountRequired"
PROBLEM_UNAUTHORIZED = ACME_ERROR_PREFIX + "unauthorized"
PROBLEM_MALFORMED = ACME_ERROR_PREFIX + "malformed"


class AutocertError(Exception):
    """Base class of every error autocert raises on purpose."""


class InvalidName(AutocertError, ValueError):
    """A host name or pattern a user gave cannot be used; the message says why in one line."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name!r}: {reason}")


class ConfigError(AutocertError):
    """A setting (option, environment variable, URL) is unusable."""


class StoreError(AutocertError):
    """The database could not be opened, migrated or written."""


class AcmeError(AutocertError):
    """The ACME server answered with a problem document or an unexpected response.

    ``problem_type`` is the RFC 8555 problem URN (``urn:ietf:params:acme:error:...``) when the
    server sent one, so that callers can record exactly what the CA said; ``retry_after`` the
    seconds its ``Retry-After`` asked for (rate limits), when it sent one.
    """

    def __init__(
        self, detail: str, *, problem_type: str | None = None, status: int | None = None, retry_after: float | None = None
    ) -> None:
        self.detail = detail
        self.problem_type = problem_type
        self.status = status
        self.retry_after = retry_after
        prefix = f"{problem_type}: " if problem_type else ""
        super().__init__(f"{prefix}{detail}")


class IssuanceError(AutocertError):
    """Issuing a certificate for ``name`` failed; carries the ACME problem when there was one."""

    def __init__(self, name: str, detail: str, *, problem_type: str | None = None) -> None:
        self.name = name
        self.detail = detail
        self.problem_type = problem_type
        prefix = f"{problem_type}: " if problem_type else ""
        super().__init__(f"{name}: {prefix}{detail}")
