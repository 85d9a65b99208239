"""The examples and the quick start run as documented, against a real Pebble.

Each runnable example is started as a user would start it; the checks are what a user would
look at: the page over verified HTTPS, the certificate, the exit status, and that nothing it
started is left running.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    REPO,
    ServeProcess,
    cli_env,
    free_port,
    port_open,
    run_cli,
    wait_for,
)

EXAMPLES = REPO / "examples"


def curl(name: str, port: int, path: str, root: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    """A real client with a real name: SNI, Host and verification as in production."""
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "60", "--cacert", str(root),
         "--resolve", f"{name}:{port}:127.0.0.1", *extra, f"https://{name}:{port}{path}"],
        capture_output=True, text=True, timeout=90,
    )


@pytest.fixture()
def wsgi_app(tmp_path: Path) -> Iterator[int]:
    """examples/wsgi_upstream.py on a free loopback port, as its docstring runs it."""
    port = free_port()
    log = tmp_path / "wsgi.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, str(EXAMPLES / "wsgi_upstream.py"), "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        def listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"wsgi_upstream exited: {log.read_text()}")
            return "listening on" in log.read_text() and port_open(port)

        wait_for(listening, timeout=30, what="the WSGI example to listen")
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0, log.read_text()


# -- the quick start ------------------------------------------------------------------------------


def demo_ports(output: str) -> list[int]:
    """Every loopback port the demo reported: Pebble's directory and serve's listeners."""
    return [int(port) for port in re.findall(r"//127\.0\.0\.1:(\d+)", output)]


def test_demo_once_issues_serves_and_cleans_up() -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / "demo.py"), "--once"], capture_output=True, text=True,
                            timeout=180, env=cli_env(), cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "HTTP/1.1 200 OK" in output
    assert "Hello from the sample app behind autocert!" in output
    assert "X-Forwarded-Proto: https" in output
    assert "Host:              demo.autocert.test:" in output
    assert "subject: CN=demo.autocert.test" in output
    assert re.search(r"issuer:  CN=Pebble Intermediate CA", output)
    assert re.search(r"serial:  [0-9a-f]+", output)
    assert re.search(r"demo\.autocert\.test\s+valid", output), "autocert status must show the name as valid"
    assert re.search(r"admin page: http://127\.0\.0\.1:\d+/", output)
    workdir = re.search(r"(/\S+/autocert-demo-[^/\s]+)/", output)
    assert workdir is not None
    assert not Path(workdir.group(1)).exists(), "the demo must remove its temporary directory"
    ports = demo_ports(output)
    assert len(ports) >= 5, output
    assert not [port for port in ports if port_open(port)], "everything the demo started must be stopped"


def test_demo_runs_until_ctrl_c_and_stops_everything(tmp_path: Path) -> None:
    log = tmp_path / "demo.out"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, str(EXAMPLES / "demo.py")], stdout=out, stderr=subprocess.STDOUT,
                                   env=cli_env(), cwd=REPO)
    try:
        def running() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the demo exited early:\n{log.read_text()}")
            return "press Ctrl-C" in log.read_text()

        wait_for(running, timeout=120, what="the demo to be up")
        hint = re.search(r"try: (curl .*)", log.read_text())
        assert hint is not None
        page = subprocess.run(hint.group(1).split(), capture_output=True, text=True, timeout=60)
        assert "Hello from the sample app" in page.stdout, page.stderr
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert "demo: stopped" in output and "Traceback" not in output
    assert not [port for port in demo_ports(output) if port_open(port)], "Ctrl-C must stop everything the demo started"


def test_demo_sh_sets_up_then_runs_the_demo_with_its_arguments(tmp_path: Path) -> None:
    """scripts/demo.sh in a copy of the repository whose set-up is already done (so it needs no
    network): it must run setup.sh, then the demo in .venv with the arguments given."""
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "demo.py").write_text("import sys\nprint('demo ran with', sys.argv[1:])\n")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    (tmp_path / ".venv" / ".autocert-installed").touch()
    missing = [tool for tool in ("pebble", "openssl", "curl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"setup.sh would install {missing}, which needs the network")
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "demo.sh"), "--once", "--name", "x.test"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo ran with ['--once', '--name', 'x.test']" in result.stdout


# -- examples behind serve --upstream -----------------------------------------------------------------


def test_wsgi_example_behind_serve_upstream(pebble, wsgi_app: int, root_ca: str, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'autocert.db'}"
    name = "wsgi.example.test"
    assert run_cli("allow", name, db=db).returncode == 0
    with ServeProcess(db, pebble, tmp_path, extra=["--upstream", f"http://127.0.0.1:{wsgi_app}"]) as server:
        result = curl(name, server.https_port, "/whoami", root_ca)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        # behind_proxy() lets the WSGI app see what the visitor used, not the proxy hop.
        assert seen["scheme"] == "https"
        assert seen["url"] == f"https://{name}:{server.https_port}/whoami"
        assert seen["client"] == "127.0.0.1"
        assert seen["forwarded"].endswith(";proto=https")

        body = tmp_path / "upload.bin"
        data = random.Random(9).randbytes(5 * 1024 * 1024)
        body.write_bytes(data)
        upload = curl(name, server.https_port, "/upload", root_ca, "--data-binary", f"@{body}")
        assert upload.returncode == 0, upload.stderr
        assert json.loads(upload.stdout) == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

        page = curl(name, server.https_port, "/", root_ca, "--include")
        assert "200 OK" in page.stdout and f"You reached https://{name}:{server.https_port}/" in page.stdout


def test_multi_tenant_script_serves_each_tenant_its_own_certificate(pebble, wsgi_app: int, root_ca: str, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'tenants.db'}"
    https_port, admin_port = pebble.tlsalpn01_port, free_port()
    env = cli_env({
        "AUTOCERT": f"{sys.executable} -m autocert",
        "UPSTREAM": f"http://127.0.0.1:{wsgi_app}",
        "AUTOCERT_DB": db,
        "AUTOCERT_HTTPS": f"127.0.0.1:{https_port}",
        "AUTOCERT_HTTP": f"127.0.0.1:{pebble.http01_port}",
        "AUTOCERT_ADMIN": f"127.0.0.1:{admin_port}",
        "AUTOCERT_DIRECTORY": pebble.directory_url,
        "AUTOCERT_CA_BUNDLE": pebble.ca_bundle,
        "AUTOCERT_EMAIL": "ops@tenants.example",
        "TENANT_CAP": "2",
    })
    log = tmp_path / "multi_tenant.out"
    with open(log, "wb") as out:
        process = subprocess.Popen(["bash", str(EXAMPLES / "multi_tenant.sh")], stdout=out, stderr=subprocess.STDOUT,
                                   env=env, cwd=REPO, start_new_session=True)
    try:
        def listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"multi_tenant.sh exited:\n{log.read_text()}")
            return log.read_text().count("listening on") >= 3

        wait_for(listening, timeout=60, what="multi_tenant.sh to serve")
        assert "allowed *.tenants.example (at most 2 names)" in log.read_text()
        allowed = json.loads(run_cli("list", "--json", db=db).stdout)["allowed"]
        assert [(entry["name"], entry.get("cap")) for entry in allowed] == [("*.tenants.example", 2)]
        serials = set()
        for tenant in ("acme", "globex"):
            name = f"{tenant}.tenants.example"
            page = curl(name, https_port, "/whoami", root_ca)
            assert page.returncode == 0, page.stderr
            assert json.loads(page.stdout)["host"] == f"{name}:{https_port}"
            status = json.loads(run_cli("status", name, "--json", db=db).stdout)["certificates"][0]
            assert status["state"] == "valid"
            serials.add(status["serial"])
        assert len(serials) == 2, "each tenant gets a certificate of its own"
        # The cap is reached: a third, made-up tenant is refused and never ordered.
        third = curl("made-up.tenants.example", https_port, "/", root_ca)
        assert third.returncode != 0 and "unrecognized name" in third.stderr.lower()
        known = [entry["name"] for entry in json.loads(run_cli("status", "--json", db=db).stdout)["certificates"]]
        assert known == ["acme.tenants.example", "globex.tenants.example"]
        outside = curl("shop.other.example", https_port, "/", root_ca)
        assert outside.returncode != 0 and "unrecognized name" in outside.stderr.lower()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=45) == 0, log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# -- the systemd unit -------------------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines by key (a key may repeat, as SystemCallFilter does)."""
    directives: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_systemd_unit_is_valid_and_hardened(tmp_path: Path) -> None:
    from autocert._config import ServeOptions

    text = (EXAMPLES / "autocert.service").read_text()
    assert re.search(r"^\[Unit\]$", text, re.MULTILINE) and re.search(r"^\[Service\]$", text, re.MULTILINE) and re.search(r"^\[Install\]$", text, re.MULTILINE)
    directives = unit_directives(text)
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "autocert",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "RestrictSUIDSGID": "yes",
    }
    for key, value in expected.items():
        assert directives.get(key) == [value], f"{key}={value} expected, found {directives.get(key)}"
    (exec_start,) = directives["ExecStart"]
    program, *arguments = exec_start.split()
    assert program.endswith("/autocert")
    # The settings file arrives as a credential; the example file is what the comments install.
    (credential,) = directives["LoadCredential"]
    name, source = credential.split(":")
    assert arguments[:2] == ["--config", f"%d/{name}"] and source == "/etc/autocert/autocert.toml"
    assert f"examples/autocert.toml {source}" in text
    from autocert._parser import parse_arguments

    from autocert._cli_manager import issuers_from_args

    args = parse_arguments([arguments[0], str(EXAMPLES / "autocert.toml"), *arguments[2:]])
    (issuer,) = issuers_from_args(args)
    assert args.command == "serve" and args.upstream and args.agree_tos and issuer.directory and issuer.email
    default_drain = ServeOptions(https=(), http=(), admin=None).shutdown_timeout
    assert seconds(directives["TimeoutStopSec"][0]) > default_drain, "systemd must give serve time to drain"

    if shutil.which("systemd-analyze") is None:
        return
    # The unit names the documented install path, /opt/autocert; verify checks that the binary
    # exists, so point a copy at the autocert installed here.
    installed = shutil.which("autocert") or str(Path(sys.executable).with_name("autocert"))
    assert Path(installed).exists()
    copy = tmp_path / "autocert.service"
    copy.write_text(text.replace(exec_start.split()[0], installed))
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stdout.strip() and "autocert.service" not in verify.stderr, verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(copy)], capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for autocert\.service: (\d+\.\d+)", security.stdout + security.stderr)
    if security.returncode == 0 and exposure:
        assert float(exposure.group(1)) <= 2.0, security.stdout


def test_compose_stop_grace_covers_the_drain() -> None:
    import yaml

    from autocert._config import ServeOptions

    grace = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["autocert-1"]["stop_grace_period"]
    assert seconds(grace) > ServeOptions(https=(), http=(), admin=None).shutdown_timeout
