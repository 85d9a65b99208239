"""The command line's options turned into a :class:`~autocert.Manager`: the database, the CAs
to order from (each an :class:`~autocert._issuers.Issuer`), the ask endpoint and dns-01.

The CAs come from one of two places. ``--directory`` (repeated), else ``AUTOCERT_DIRECTORY``
(a comma list), else a top-level ``directory`` in the config file, names them all, and every
one gets the same options (``--email``, ``--ca-bundle``, ``--profile``, ``--eab-*``). Without
any of those, the config file's ``[[issuer]]`` tables name them, in order, each with its own
settings; an option given on the command line or in the environment still applies to every
CA, over what the tables say (the file gives way to both). With neither: Let's Encrypt.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from ._config import LETS_ENCRYPT_DIRECTORY, default_db_url, parse_external_account, parse_order_limit, parse_seconds_above_zero
from ._config_file import ConfigFile
from ._errors import ConfigError
from ._issuers import DIRECTORY_ENV, Issuer, check_directory, directories_from, issuers_for, parse_directories

if TYPE_CHECKING:  # imported where used: `serve` binds its ports before loading the server
    from ._dns import DnsSettings
    from ._manager import Manager


def db_url(args: argparse.Namespace) -> str:
    return getattr(args, "db", None) or os.environ.get("AUTOCERT_DB") or default_db_url()


def manager_from_args(args: argparse.Namespace, *, challenge_types: Sequence[str], **extra: Any) -> Manager:
    from ._manager import Manager

    extra.setdefault("renew", False)  # one-shot commands do only what they were asked
    return Manager(
        db=db_url(args),
        issuers=issuers_from_args(args),
        ask=args.ask or None,
        ask_timeout=parse_seconds_above_zero(args.ask_timeout, option="--ask-timeout"),
        dns=dns_settings(args),
        agree_tos=args.agree_tos,
        challenge_types=challenge_types,
        **extra,
    )


def issuers_from_args(args: argparse.Namespace) -> tuple[Issuer, ...]:
    """The CAs in the order they are tried, each with its settings (see the module's doc);
    anything wrong with one (a URL, a trust-anchor file, half an EAB pair) is a
    :class:`ConfigError` naming where it came from."""
    order_limit: tuple[int, timedelta] | None | Literal["auto"] = "auto"
    if args.order_limit is not None:
        order_limit = parse_order_limit(args.order_limit)
    config: ConfigFile | None = getattr(args, "config_file", None)
    if config is None or not config.issuers or args.directory or os.environ.get(DIRECTORY_ENV):
        eab = parse_external_account(args.eab_kid, args.eab_hmac_key)
        return issuers_for(directories_from(args.directory, os.environ, LETS_ENCRYPT_DIRECTORY), email=args.email,
                           ca_bundle=args.ca_bundle, profile=args.profile, order_limit=order_limit, eab=eab)
    given_eab = (args.eab_kid, args.eab_hmac_key) if args.eab_kid or args.eab_hmac_key else None
    issuers = []
    for index, table in enumerate(config.issuers):
        settings = {key: value if value is not None else table.get(key) for key, value in
                    (("email", args.email), ("ca_bundle", args.ca_bundle), ("profile", args.profile))}
        try:
            directory = check_directory(table.get("directory", LETS_ENCRYPT_DIRECTORY), option="directory")
            eab = parse_external_account(*(given_eab or (table.get("eab_kid"), table.get("eab_hmac_key"))))
            issuers.append(Issuer(directory, order_limit=order_limit, eab=eab, **settings))
        except ConfigError as exc:
            raise ConfigError(f"{config.path}: [[issuer]] table {index + 1}: {exc}") from None
    parse_directories([issuer.directory for issuer in issuers], option=f"{config.path}: [[issuer]] directory")
    return tuple(issuers)


def primary_directory(args: argparse.Namespace) -> str:
    """The first CA's directory, found as :func:`issuers_from_args` finds it but without
    reading any other setting (for commands without the ACME options, such as ``status``)."""
    config: ConfigFile | None = getattr(args, "config_file", None)
    from_file: list[str] | None = None
    if config is not None and not os.environ.get(DIRECTORY_ENV):
        top = config.options.get("directory")
        if top:
            from_file = [top] if isinstance(top, str) else list(top)
        elif config.issuers:
            from_file = [config.issuers[0].get("directory", LETS_ENCRYPT_DIRECTORY)]
    return directories_from(getattr(args, "directory", None) or from_file, os.environ, LETS_ENCRYPT_DIRECTORY)[0]


def dns_settings(args: argparse.Namespace) -> DnsSettings | None:
    """``--dns``, ``--dns-resolver`` and ``--dns-timeout`` as the manager takes them."""
    timeout = parse_seconds_above_zero(args.dns_timeout, option="--dns-timeout")
    if not args.dns:
        for option, given in (("--dns-resolver", args.dns_resolver), ("--prefer-dns", args.prefer_dns)):
            if given:
                raise ConfigError(f"{option} needs --dns: a provider to publish dns-01 records with")
        return None
    from ._dns import DnsLookup, DnsSettings, parse_provider, parse_resolvers

    lookup = DnsLookup(parse_resolvers(args.dns_resolver))
    return DnsSettings(parse_provider(args.dns, lookup), lookup, timeout=timeout)
