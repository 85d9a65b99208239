"""Private keys at rest: sealed with ``AUTOCERT_SECRET`` when it is set.

A database dump or backup then holds no usable key. Keys written before a secret was set
stay readable (they are recognised by the missing prefix), so turning the secret on never
strands existing data; a wrong or missing secret is reported, never silently ignored.
"""

from __future__ import annotations

import base64
import functools

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ._errors import StoreError

SEALED_PREFIX = b"autocert-sealed:v1:"
_SALT = b"autocert private keys at rest v1"


@functools.lru_cache(maxsize=4)
def _fernet(secret: str) -> Fernet:
    # scrypt makes guessing a weak secret from a stolen database expensive; it runs once
    # per process and secret.
    key = Scrypt(salt=_SALT, length=32, n=2**15, r=8, p=1).derive(secret.encode())
    return Fernet(base64.urlsafe_b64encode(key))


class KeySealer:
    """Seals and unseals private-key blobs for the store."""

    def __init__(self, secret: str | None) -> None:
        self._secret = secret or None

    @property
    def enabled(self) -> bool:
        return self._secret is not None

    def seal(self, pem: bytes) -> bytes:
        if self._secret is None:
            return pem
        return SEALED_PREFIX + _fernet(self._secret).encrypt(pem)

    def unseal(self, blob: bytes) -> bytes:
        if not blob.startswith(SEALED_PREFIX):
            return blob
        if self._secret is None:
            raise StoreError("private keys in this database are encrypted: set AUTOCERT_SECRET to the secret used")
        try:
            return _fernet(self._secret).decrypt(blob[len(SEALED_PREFIX) :])
        except InvalidToken:
            raise StoreError("AUTOCERT_SECRET does not match the secret the private keys were encrypted with") from None
