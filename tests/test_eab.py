"""External Account Binding against a Pebble that requires it: the right key registers and
issues, no key and a wrong key each fail in one line that says what to set."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest
from pebble import Pebble, free_port
from support import acme_args, run_cli

from autocert._cli import run

KID = "kid-autocert-test"


@pytest.fixture(scope="module")
def eab_pebble(tmp_path_factory: pytest.TempPathFactory) -> object:
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    config = {"externalAccountBindingRequired": True, "externalAccountMACKeys": {KID: key}}
    with Pebble(workdir=tmp_path_factory.mktemp("pebble-eab"), config=config) as instance:
        yield instance, key


def issue(pebble: Pebble, db: str, name: str, *eab: str) -> tuple[int, str, str]:
    assert run(["--db", db, "allow", name]) == 0  # in this process: the issue below is the one under test
    result = run_cli("issue", name, *acme_args(pebble), "--http", f"127.0.0.1:{pebble.http01_port}", "--https", "none",
                     *eab, db=db, timeout=90)
    return result.returncode, result.stdout, result.stderr


def test_the_right_key_registers_and_issues(eab_pebble: tuple[Pebble, str], db: str) -> None:
    pebble, key = eab_pebble
    code, out, err = issue(pebble, db, "eab.example.test", "--eab-kid", KID, "--eab-hmac-key", key)
    assert code == 0, out + err
    assert "eab.example.test: valid" in out


def test_without_a_binding_one_line_names_it_and_the_options(eab_pebble: tuple[Pebble, str], db: str) -> None:
    pebble, _key = eab_pebble
    code, out, err = issue(pebble, db, "none.example.test")
    assert code == 1
    lines = out.splitlines()  # the outcome, one line a name (the log on stderr says it too)
    assert len(lines) == 1 and "requires External Account Binding" in lines[0], out + err
    assert "--eab-kid" in lines[0] and "--eab-hmac-key" in lines[0]


def test_a_wrong_key_is_refused_in_one_line(eab_pebble: tuple[Pebble, str], db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pebble, _key = eab_pebble
    wrong = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    # The key from the environment: the options and their variables are one source.
    monkeypatch.setenv("AUTOCERT_EAB_KID", KID)
    monkeypatch.setenv("AUTOCERT_EAB_HMAC_KEY", wrong)
    code, out, err = issue(pebble, db, "wrong.example.test")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 1 and "refused the External Account Binding" in lines[0], out + err
    assert KID in lines[0] and "--eab-hmac-key" in lines[0]
    assert wrong not in out + err


@pytest.mark.parametrize(("given", "expected"), [
    (["--eab-kid", KID], "--eab-kid needs --eab-hmac-key"),
    (["--eab-hmac-key", "c2VjcmV0"], "--eab-hmac-key needs --eab-kid"),
    (["--eab-kid", KID, "--eab-hmac-key", "not base64!"], "--eab-hmac-key: not a base64url key"),
])
def test_half_a_binding_is_bad_usage(given: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "untouched.db"
    assert run(["--db", f"sqlite:///{db}", "issue", "x.example.test", "--directory", "https://127.0.0.1:9/dir", *given]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("autocert: error: ") and expected in lines[0]
    assert not db.exists(), "nothing is written"


def test_each_issuer_table_registers_with_its_own_binding(eab_pebble: tuple[Pebble, str], db: str, tmp_path: Path) -> None:
    """Config file tables as CAs in order: a primary that is down, then the Pebble requiring
    External Account Binding with the key it gave; the order falls back and registers there."""
    pebble, key = eab_pebble
    config = tmp_path / "autocert.toml"
    config.write_text(f'agree_tos = true\nhttp = "127.0.0.1:{pebble.http01_port}"\nhttps = "none"\n\n'
                      f'[[issuer]]\ndirectory = "https://127.0.0.1:{free_port()}/dir"\n\n'
                      f'[[issuer]]\ndirectory = "{pebble.directory_url}"\nca_bundle = "{pebble.ca_bundle}"\n'
                      f'eab_kid = "{KID}"\neab_hmac_key = "{key}"\n')
    assert run(["--db", db, "allow", "tables.example.test"]) == 0
    result = run_cli("issue", "tables.example.test", "--config", str(config), db=db, timeout=90,
                     env={"AUTOCERT_DIRECTORY": "", "AUTOCERT_EAB_KID": "", "AUTOCERT_EAB_HMAC_KEY": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tables.example.test: valid" in result.stdout
    assert f"trying {pebble.directory_url.split('/')[2]}" in result.stderr, "the primary was tried first"
    assert key not in result.stdout + result.stderr
