"""The config file (``--config FILE``): one more source for the command line's own options.

A TOML file names every long option by its name with ``_`` for ``-`` (``first_contact_wait =
10``), lists for repeatable options, and ``[[issuer]]`` tables for the CAs to order from, in
the order they are tried, each with its own ACME settings. Its top-level values become the
defaults of the options they name, so the one parser still checks and converts every value,
and the order of precedence falls out: the file gives way to an option's environment
variable, which gives way to the option on the command line. The tables are turned into the
list of CAs after parsing (``_cli_manager.issuers_from_args``), where a ``--directory`` or
``AUTOCERT_DIRECTORY`` replaces them and an ACME option given on the command line or in the
environment applies to every CA over them.

``tomllib`` reports no positions for keys, so an unknown key or a value of the wrong type is
reported with the line found by scanning the text for the key.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._errors import ConfigError

#: What an ``[[issuer]]`` table may hold: the options that describe one CA and our account there.
ISSUER_KEYS = ("directory", "email", "eab_kid", "eab_hmac_key", "profile", "ca_bundle")

#: Options that make no sense in a file: they exit at once, or they name the file itself.
NOT_IN_FILE = ("help", "version", "config")


@dataclass
class ConfigFile:
    """A parsed config file. ``issuers`` are the ``[[issuer]]`` tables in the file's order:
    the CAs, the first of them the primary."""

    path: str
    text: str
    options: dict[str, Any] = field(default_factory=dict)
    issuers: list[dict[str, Any]] = field(default_factory=list)

    def line_of(self, key: str, issuer: int | None = None) -> int:
        """The line where ``key`` is set (in the ``issuer``-th ``[[issuer]]`` table), or 0."""
        lines = self.text.splitlines()
        start = 0
        if issuer is not None:
            headers = [number for number, line in enumerate(lines) if re.match(r"\s*\[\[\s*issuer\s*\]\]", line)]
            start = headers[issuer] + 1 if issuer < len(headers) else 0
        pattern = re.compile(rf"""\s*(\[+\s*)?(["']?){re.escape(key)}\2\s*(=|\]|\.)""")
        for number in range(start, len(lines)):
            if pattern.match(lines[number]):
                return number + 1
        return 0

    def error(self, key: str, message: str, issuer: int | None = None) -> ConfigError:
        line = self.line_of(key, issuer)
        return ConfigError(f"{self.path}{f':{line}' if line else ''}: {key}: {message}")


def load_config_file(path: str) -> ConfigFile:
    """Read and parse ``path``; the ``[[issuer]]`` tables are taken apart here."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise ConfigError(f"--config {path!r}: {exc.strerror or exc}") from None
    text = raw.decode("utf-8", "replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = ConfigFile(path, text)
    issuers = data.pop("issuer", [])
    if not isinstance(issuers, list) or not all(isinstance(table, dict) for table in issuers):
        raise config.error("issuer", "expected [[issuer]] tables")
    for index, table in enumerate(issuers):
        for key, value in table.items():
            if key not in ISSUER_KEYS:
                raise config.error(key, f"not a setting of an [[issuer]] table (those are {', '.join(ISSUER_KEYS)})", index)
            if not isinstance(value, str):
                raise config.error(key, "expected a string", index)
            if key in data:
                # A top-level value applies to every CA; one CA's own would be a second answer.
                raise config.error(key, f"given both at the top level and in the {_ordinal(index)} [[issuer]] table; keep one", index)
    config.options, config.issuers = data, issuers
    return config


def _ordinal(index: int) -> str:
    return ("first", "second", "third")[index] if index < 3 else f"{index + 1}th"


def option_actions(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """Every long option of ``parser`` and its subcommands, by its name in a file."""
    found: dict[str, list[argparse.Action]] = {}
    for action in _walk(parser):
        for option in action.option_strings:
            if option.startswith("--"):
                key = option[2:].replace("-", "_")
                if key not in NOT_IN_FILE and action not in found.setdefault(key, []):
                    found[key].append(action)
    return found


def _walk(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in dict.fromkeys(action.choices.values()):
                yield from _walk(subparser)
        else:
            yield action


def apply_config_file(parser: argparse.ArgumentParser, config: ConfigFile, env_names: Collection[str]) -> None:
    """Make the file's top-level values the defaults of the options they name, except where
    the option's environment variable (one of ``env_names``) is set: it wins over the file.
    The ``[[issuer]]`` tables are left to the code that puts the CAs together."""
    actions = option_actions(parser)
    for key, value in config.options.items():
        if key not in actions:
            raise config.error(key, "unknown option (a file takes the long options of the command line, with _ for -)")
        default = _converted(config, key, value, actions[key][0])
        variable = f"AUTOCERT_{key.upper()}"
        if variable in env_names and os.environ.get(variable):
            continue
        for action in actions[key]:
            action.default = default


def _converted(config: ConfigFile, key: str, value: Any, action: argparse.Action) -> Any:
    """The value as the command line would have given it: flags take true or false,
    repeatable options a list of strings, every other option a string or a number."""
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise config.error(key, "expected true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) for item in items):
            raise config.error(key, "expected a list of strings")
        return items
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise config.error(key, "expected a string or a number")
    text = str(value)
    if action.choices is not None and text not in action.choices:
        raise config.error(key, f"expected one of {', '.join(map(str, action.choices))}")
    return text
