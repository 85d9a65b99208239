"""``--config FILE``: a TOML file as one more source for the command line's own options, below
the environment and the command line; mistakes are named with their line, exit 2."""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path

import pytest
from pebble import Pebble
from support import run_cli

from autocert._cli import run
from autocert._cli_manager import issuers_from_args
from autocert._config import ExternalAccount
from autocert._parser import build_parser, parse_arguments
from autocert._config_file import ISSUER_KEYS, option_actions


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "autocert.toml"
    path.write_text(text)
    return str(path)


def test_the_file_gives_way_to_the_environment_which_gives_way_to_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'first_contact_wait = 10\nidle_timeout = 5\nhsts = true\nemail = "file@example.test"\n'
                           'log_format = "json"\n')
    for variable in ("AUTOCERT_FIRST_CONTACT_WAIT", "AUTOCERT_IDLE_TIMEOUT", "AUTOCERT_EMAIL", "AUTOCERT_LOG_FORMAT"):
        monkeypatch.delenv(variable, raising=False)
    args = parse_arguments(["--config", path, "serve"])
    assert (args.first_contact_wait, args.idle_timeout, args.hsts, args.email, args.log_format) == ("10", "5", True, "file@example.test", "json")

    monkeypatch.setenv("AUTOCERT_FIRST_CONTACT_WAIT", "20")
    monkeypatch.setenv("AUTOCERT_EMAIL", "env@example.test")
    args = parse_arguments(["serve", "--config", path, "--first-contact-wait", "30"])
    assert (args.first_contact_wait, args.idle_timeout, args.email) == ("30", "5", "env@example.test")

    monkeypatch.setenv("AUTOCERT_CONFIG", path)  # the file's own variable
    assert parse_arguments(["serve"]).idle_timeout == "5"


def test_the_issuer_tables_are_the_cas_in_order_each_with_its_own_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("AUTOCERT_DIRECTORY", "AUTOCERT_EMAIL", "AUTOCERT_PROFILE", "AUTOCERT_CA_BUNDLE", "AUTOCERT_EAB_KID",
                     "AUTOCERT_EAB_HMAC_KEY", "AUTOCERT_ORDER_LIMIT"):
        monkeypatch.delenv(variable, raising=False)
    path = write(tmp_path, 'order_limit = "10/1h"\n\n[[issuer]]\ndirectory = "https://ca.example/dir"\nemail = "ops@example.test"\n'
                           'profile = "tlsserver"\n\n[[issuer]]\ndirectory = "https://fallback.example/dir"\neab_kid = "kid-2"\n'
                           'eab_hmac_key = "c2VjcmV0"\n')
    primary, fallback = issuers_from_args(parse_arguments(["--config", path, "issue", "a.example.test"]))
    assert (primary.directory, primary.email, primary.profile, primary.eab) == ("https://ca.example/dir", "ops@example.test", "tlsserver", None)
    assert (fallback.directory, fallback.email, fallback.profile) == ("https://fallback.example/dir", None, None)
    assert fallback.eab == ExternalAccount("kid-2", "c2VjcmV0"), "each CA registers with its own binding"
    assert primary.order_limit == fallback.order_limit == (10, timedelta(hours=1)), "a top-level option applies to every CA"

    # An ACME option on the command line (or in the environment) applies to every CA, over the tables.
    args = parse_arguments(["--config", path, "issue", "a.example.test", "--email", "cli@example.test", "--eab-kid", "kid",
                            "--eab-hmac-key", "a2V5"])
    assert [(issuer.email, issuer.eab) for issuer in issuers_from_args(args)] == [("cli@example.test", ExternalAccount("kid", "a2V5"))] * 2
    monkeypatch.setenv("AUTOCERT_PROFILE", "classic")
    assert {issuer.profile for issuer in issuers_from_args(parse_arguments(["--config", path, "renew"]))} == {"classic"}

    # --directory (or AUTOCERT_DIRECTORY) replaces the tables, with the options every CA gets.
    (only,) = issuers_from_args(parse_arguments(["--config", path, "issue", "a.example.test", "--directory", "https://cli.example/dir"]))
    assert (only.directory, only.email, only.eab) == ("https://cli.example/dir", None, None)
    monkeypatch.setenv("AUTOCERT_DIRECTORY", "https://env.example/dir,https://env2.example/dir")
    assert [issuer.directory for issuer in issuers_from_args(parse_arguments(["--config", path, "renew"]))] == [
        "https://env.example/dir", "https://env2.example/dir"]


def test_a_top_level_directory_list_is_replaced_by_the_command_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOCERT_DIRECTORY", raising=False)
    path = write(tmp_path, 'directory = ["https://a.example/dir", "https://b.example/dir"]\n')
    assert parse_arguments(["--config", path, "renew"]).directory == ["https://a.example/dir", "https://b.example/dir"]
    args = parse_arguments(["--config", path, "renew", "--directory", "https://c.example/dir"])
    assert args.directory == ["https://c.example/dir"], "not added to the file's list"


@pytest.mark.parametrize(("text", "expected"), [
    ('[[issuer]]\ndirectory = "https://a.example/dir"\n[[issuer]]\ndirectory = "https://a.example/dir"\n', "given twice"),
    ('[[issuer]]\ndirectory = "a.example"\n', "[[issuer]] table 1: directory 'a.example': expected the https:// URL"),
    ('[[issuer]]\ndirectory = "https://a.example/dir"\n[[issuer]]\ndirectory = "https://b.example/dir"\neab_kid = "k"\n',
     "[[issuer]] table 2: --eab-kid needs --eab-hmac-key"),
    ('[[issuer]]\ndirectory = "https://a.example/dir"\nca_bundle = "/nonexistent/ca.pem"\n', "[[issuer]] table 1: --ca-bundle"),
])
def test_a_bad_issuer_table_stops_issue_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                    text: str, expected: str) -> None:
    monkeypatch.delenv("AUTOCERT_DIRECTORY", raising=False)
    path = write(tmp_path, text)
    db = tmp_path / "untouched.db"
    assert run(["--config", path, "--db", f"sqlite:///{db}", "issue", "a.example.test"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"autocert: error: {path}") and expected in lines[0], lines


@pytest.mark.parametrize(("text", "expected"), [
    ('email = "a@b.c"\n\nfirst_contact_wiat = 10\n', ":3: first_contact_wiat: unknown option"),
    ('[server]\nhttps = "0.0.0.0:443"\n', ":1: server: unknown option"),
    ('https = "0.0.0.0:443"\n[[issuer]]\ndirectory = "u"\n\n[[issuer]]\ndirectroy = "u"\n', ":6: directroy: not a setting of an [[issuer]] table"),
    ('hsts = "yes"\n', ":1: hsts: expected true or false"),
    ('email = "a@b.c"\nadmin = true\n', ":2: admin: expected a string or a number"),
    ('https = 443.0\n', ":1: https: expected a list of strings"),
    ('state = [1, 2]\n', ":1: state: expected a list of strings"),
    ('log_format = "xml"\n', ":1: log_format: expected one of text, json"),
    ('email = "a"\n[[issuer]]\nemail = "b"\n', ":3: email: given both at the top level and in the first [[issuer]] table"),
    ('directory = "u"\n[[issuer]]\nemail = "b"\n[[issuer]]\ndirectory = "v"\n', ":5: directory: given both at the top level and in the second"),
    ('https = "0.0.0.0:443\n', ": not valid TOML: "),
])
def test_a_mistake_is_one_line_naming_the_key_and_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str) -> None:
    path = write(tmp_path, text)
    db = tmp_path / "untouched.db"
    assert run(["--config", path, "--db", f"sqlite:///{db}", "allow", "a.example.test"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"autocert: error: {path}") and expected in lines[0], lines
    assert not db.exists()


def test_a_missing_file_is_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--config", str(tmp_path / "nope.toml"), "list"]) == 2
    assert "--config" in capsys.readouterr().err


def file_value(action: argparse.Action) -> object:
    if action.nargs == 0:
        return True
    if isinstance(action, argparse._AppendAction):
        return ["failed"]
    if action.choices is not None:
        return list(action.choices)[-1]
    return "7"


def test_every_long_option_of_every_command_is_accepted_by_its_name(tmp_path: Path) -> None:
    """The list comes from the parser, so an option added later is covered without a change here."""
    actions = option_actions(build_parser())
    assert {"https", "first_contact_wait", "ask", "ask_timeout", "eab_kid", "db", "json", "wait", "state"} <= set(actions)
    assert set(ISSUER_KEYS) <= set(actions), "every issuer setting is an option too"
    lines = []
    for key, found in sorted(actions.items()):
        value = file_value(found[0])
        lines.append(f"{key} = {value!r}".replace("'", '"').replace("True", "true"))
    path = write(tmp_path, "\n".join(lines) + "\n")
    for command in (["serve"], ["issue", "a.example.test"], ["status"], ["allow", "a.example.test"], ["revoke", "a.example.test"]):
        args = parse_arguments(["--config", path, *command])
        for key, found in actions.items():
            dest = found[0].dest
            if hasattr(args, dest) and dest not in ("names", "command"):
                assert getattr(args, dest) == file_value(found[0]) or os.environ.get(f"AUTOCERT_{key.upper()}"), (command, key)


def test_issue_from_a_config_file_alone(pebble: Pebble, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'file.db'}"
    path = write(tmp_path, f'db = "{db}"\nhttp = "127.0.0.1:{pebble.http01_port}"\nhttps = "none"\nagree_tos = true\n\n'
                           f'[[issuer]]\ndirectory = "{pebble.directory_url}"\nca_bundle = "{pebble.ca_bundle}"\nemail = "ops@example.test"\n')
    assert run(["--config", path, "allow", "file.example.test"]) == 0
    result = run_cli("issue", "file.example.test", env={"AUTOCERT_CONFIG": path})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "file.example.test: valid" in result.stdout


def test_listeners_on_the_command_line_replace_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'https = ["127.0.0.1:8443", "[::1]:8443"]\nhttp = "none"\n')
    args = parse_arguments(["--config", path, "serve"])
    assert args.https == ["127.0.0.1:8443", "[::1]:8443"] and args.http == ["none"]
    args = parse_arguments(["--config", path, "serve", "--https", ":443", "--https", "127.0.0.2:443"])
    assert args.https == [":443", "127.0.0.2:443"], "the command line's listeners replace the file's"
    monkeypatch.setenv("AUTOCERT_HTTPS", "127.0.0.3:443")
    assert parse_arguments(["--config", path, "serve"]).https is None, "the environment overrides the file"
