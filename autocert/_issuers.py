"""The CAs autocert orders from, in the order they are tried, each with its own settings.

A CA's options (contact, trust anchors, profile, order budget, External Account Binding)
belong to the account autocert holds there, so they travel with its directory rather than
sitting beside a list of URLs: a second CA may want another contact, other EAB credentials or
no profile at all. The command line gives every CA the same options; a configuration file's
``[[issuer]]`` tables give each its own.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from ._config import ExternalAccount, check_ca_bundle
from ._errors import ConfigError

__all__ = ["DIRECTORY_ENV", "Issuer", "ca_label", "check_directory", "directories_from", "issuers_for", "parse_directories"]

#: The environment variable that names the CAs: one directory URL, or several separated by commas.
DIRECTORY_ENV = "AUTOCERT_DIRECTORY"


@dataclass(frozen=True)
class Issuer:
    """One CA to order from and the options of our account there.

    The first issuer of a list is the primary: every order (renewals too) starts there, and
    moves to the next only when the CA, not the name, is why it could not be completed.
    """

    #: The CA's ACME directory URL; autocert keeps one account per directory.
    directory: str
    #: The account's contact address. Default none: the CA cannot reach you.
    email: str | None = None
    #: PEM file trusted for this CA's own TLS. Default None, the system store.
    ca_bundle: str | None = None
    #: Certificate profile ordered here when the CA offers it. Default None, the CA's own.
    profile: str | None = None
    #: New orders kept under at this CA: (orders, window), None for no budget of our own, or
    #: ``"auto"``: just under Let's Encrypt's limits for its directories, none elsewhere.
    order_limit: tuple[int, timedelta] | None | Literal["auto"] = "auto"
    #: External Account Binding for registering the account here (the key id and MAC key
    #: this CA gave). Default None; a CA that requires it refuses to register without it.
    eab: ExternalAccount | None = None

    def __post_init__(self) -> None:
        check_ca_bundle(self.ca_bundle)  # a missing file is caught at start, not at the first order


def issuers_for(
    directory: str | Sequence[str],
    *,
    email: str | None = None,
    ca_bundle: str | None = None,
    profile: str | None = None,
    order_limit: tuple[int, timedelta] | None | Literal["auto"] = "auto",
    eab: ExternalAccount | None = None,
) -> tuple[Issuer, ...]:
    """One issuer per directory, in order, all with the same options (as the command line
    gives them)."""
    directories = (directory,) if isinstance(directory, str) else tuple(directory)
    if not directories:
        raise ConfigError("no ACME directory given")
    return tuple(Issuer(url, email=email, ca_bundle=ca_bundle, profile=profile, order_limit=order_limit, eab=eab) for url in directories)


def check_directory(url: str, *, option: str = "--directory") -> str:
    """An ACME directory must be an absolute http(s) URL: caught at start, not at the first order."""
    text = url.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        _ = parts.port  # a port out of range raises ValueError
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{option} {url!r}: expected the https:// URL of an ACME directory")
    return text


def parse_directories(urls: Iterable[str], *, option: str = "--directory") -> tuple[str, ...]:
    """Directory URLs in the order they are tried; one given twice is refused (its account
    would be tried twice for nothing)."""
    directories: list[str] = []
    for url in urls:
        directory = check_directory(url, option=option)
        if directory in directories:
            raise ConfigError(f"{option} {url!r}: given twice")
        directories.append(directory)
    if not directories:
        raise ConfigError(f"{option}: no ACME directory given")
    return tuple(directories)


def directories_from(given: Sequence[str] | None, environ: Mapping[str, str], default: str) -> tuple[str, ...]:
    """The CAs in the order they are tried: each ``--directory`` given, else the
    comma-separated list in :data:`DIRECTORY_ENV`, else ``default``."""
    if given:
        return parse_directories(given)
    listed = environ.get(DIRECTORY_ENV, "").strip()
    if listed:
        return parse_directories(listed.split(","), option=DIRECTORY_ENV)
    return (default,)


def ca_label(directory: str) -> str:
    """What a person recognises a CA by in a table or a log line: its directory's host (and port,
    when it has one)."""
    parts = urllib.parse.urlsplit(directory)
    return parts.netloc.rpartition("@")[2] or directory
