"""docker-compose.yml and the Dockerfiles it builds refer only to things that exist.

There is no container engine on the test machines, so this checks by reading: every build
context, Dockerfile, COPY source, mounted file and command line, and that the services agree
with each other (ports, addresses, URLs). What can run without Docker does run: the files the
Dockerfile copies build the wheel, the commands parse with autocert's own parser, the Pebble
listener certificate script works, and Debian's Pebble accepts the compose Pebble config.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pebble import Pebble
from support import REPO, ServeProcess, fetch, free_port, port_open, run_cli, served_certificate, wait_for

COMPOSE = REPO / "docker-compose.yml"
#: The autocert instances the compose file runs behind its balancer.
INSTANCES = ("autocert-1", "autocert-2")
BALANCER_CONFIG = REPO / "examples/compose/haproxy.cfg"


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}``, with every variable unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [interpolate(part) for part in (shlex.split(value) if isinstance(value, str) else value)]


def build_of(service: dict[str, Any]) -> tuple[Path, Path] | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (REPO / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            result.append((instruction.upper(), rest.strip()))
    return result


def copy_sources(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context (not from other stages)."""
    copies = []
    for instruction, rest in dockerfile_instructions(path):
        if instruction not in ("COPY", "ADD"):
            continue
        parts = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        if any(part.startswith("--from") for part in parts):
            continue
        parts = [part for part in parts if not part.startswith("--")]
        copies.append((parts[:-1], parts[-1]))
    return copies


def mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(kind, source, target) for each volume entry: kind is ``bind`` or ``volume``."""
    result = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        else:
            kind, source, target = entry["type"], entry["source"], entry["target"]
        result.append((kind, source, target))
    return result


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def host_path(service: dict[str, Any], path: str) -> Path:
    """The repository file a bind mount puts at ``path`` in the container."""
    for kind, source, target in mounts(service):
        if kind == "bind" and (PurePosixPath(path) == PurePosixPath(target) or PurePosixPath(target) in PurePosixPath(path).parents):
            return REPO / source / PurePosixPath(path).relative_to(target)
    raise AssertionError(f"{path} is not bind-mounted from the repository")


def settings(name: str) -> argparse.Namespace:
    """What an autocert service runs with: its command, over its config file as mounted."""
    from autocert._parser import parse_arguments

    service = services()[name]
    args = argv(service.get("command"))
    if "--config" in args:
        index = args.index("--config") + 1
        args[index] = str(host_path(service, args[index]))
    return parse_arguments(args)


def primary_issuer(args: argparse.Namespace) -> dict[str, str]:
    """The first CA the service orders from: its config file's first [[issuer]] table (read
    as the file says it: the trust anchors it names exist only inside the container)."""
    assert args.config_file is not None and args.config_file.issuers, "the CA is set in the config file"
    return args.config_file.issuers[0]


def built_services() -> list[str]:
    return [name for name, service in services().items() if "build" in service]


# -- what the file refers to exists ---------------------------------------------------------------


def test_the_expected_services_use_the_expected_images() -> None:
    found = services()
    assert {"pebble", "challtestsrv", "postgres", "balancer", "app", *INSTANCES} <= set(found)
    assert found["pebble"]["image"].startswith("ghcr.io/letsencrypt/pebble:")
    assert found["challtestsrv"]["image"].startswith("ghcr.io/letsencrypt/pebble-challtestsrv:")
    assert found["postgres"]["image"].split(":")[0] == "postgres"
    assert found["balancer"]["image"].split(":")[0] == "haproxy"
    for instance in INSTANCES:
        assert build_of(found[instance]) == (REPO, REPO / "Dockerfile")


@pytest.mark.parametrize("name", built_services())
def test_build_context_dockerfile_and_copy_sources_exist(name: str) -> None:
    built = build_of(services()[name])
    assert built is not None
    context, dockerfile = built
    assert context.is_dir(), f"{name}: build context {context} is missing"
    assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
    assert context == REPO or REPO in context.parents, f"{name}: build context outside the repository"
    copies = copy_sources(dockerfile)
    assert copies, f"{name}: {dockerfile} copies nothing"
    for sources, _destination in copies:
        for source in sources:
            assert (context / source).exists(), f"{name}: {dockerfile.name} copies {source!r}, which is not in {context}"


def test_every_mounted_file_exists_and_every_named_volume_is_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for kind, source, target in mounts(service):
            assert PurePosixPath(target).is_absolute(), f"{name}: mount target {target!r} is not absolute"
            if kind == "bind":
                assert (REPO / source).exists(), f"{name}: mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared under volumes:"


def test_paths_in_commands_are_provided_by_a_mount_or_the_image() -> None:
    """Each absolute path a command names lies under one of the service's mounts, and a file
    from a bind mount exists in the repository. Images we do not build are trusted for paths
    of their own (their binaries), but not for anything under a mount target."""
    for name, service in services().items():
        args = argv(service.get("entrypoint")) + argv(service.get("command"))
        service_mounts = mounts(service)
        for arg in args:
            if not arg.startswith("/"):
                continue
            path = PurePosixPath(arg)
            covering = [(kind, source, PurePosixPath(target)) for kind, source, target in service_mounts
                        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents]
            if not covering:
                assert "build" not in service, f"{name}: {arg} is neither mounted nor part of an image we build"
                continue
            kind, source, target = max(covering, key=lambda item: len(item[2].parts))
            if kind == "bind":
                host = (REPO / source / path.relative_to(target)) if path != target else REPO / source
                assert host.exists(), f"{name}: {arg} comes from {host}, which does not exist"


@pytest.mark.parametrize("instance", INSTANCES)
def test_paths_in_the_config_file_are_mounted_too(instance: str) -> None:
    service = services()[instance]
    ca_bundle = primary_issuer(settings(instance))["ca_bundle"]
    assert ca_bundle.startswith("/")
    targets = [PurePosixPath(target) for _kind, _source, target in mounts(service)]
    assert any(target in PurePosixPath(ca_bundle).parents for target in targets), "ca_bundle is not mounted"


def test_dockerfile_commands_run_files_they_copy() -> None:
    for name in built_services():
        _context, dockerfile = build_of(services()[name])  # type: ignore[misc]
        copied = {PurePosixPath(source).name for sources, _ in copy_sources(dockerfile) for source in sources}
        for instruction, rest in dockerfile_instructions(dockerfile):
            if instruction in ("CMD", "ENTRYPOINT") and rest.startswith("["):
                for arg in json.loads(rest):
                    if arg.endswith(".py"):
                        assert arg in copied, f"{name}: {dockerfile.name} runs {arg} but does not copy it"


def test_depends_on_names_real_services() -> None:
    names = set(services())
    for name, service in services().items():
        depends = service.get("depends_on") or []
        for dependency in depends if isinstance(depends, list) else depends.keys():
            assert dependency in names, f"{name} depends on unknown service {dependency!r}"


# -- the services agree with each other --------------------------------------------------------------


@pytest.mark.parametrize("instance", INSTANCES)
def test_autocert_commands_parse_and_point_at_the_other_services(instance: str) -> None:
    from autocert._parser import build_parser

    found = services()
    args = settings(instance)
    assert args.command == "serve"
    assert args.config_file is not None, "serve's settings live in the mounted config file"
    assert args.upstream == "http://app:8000"
    app_cmd = json.loads(dict(dockerfile_instructions(REPO / "examples/app/Dockerfile"))["CMD"])
    assert option(app_cmd, "--port") == "8000", "the app must listen where --upstream points"
    issuer = primary_issuer(args)
    assert issuer["directory"].startswith("https://pebble:")
    assert issuer["ca_bundle"] == "/certs/ca.pem" and args.agree_tos and issuer["email"]
    postgres = found["postgres"]["environment"]
    expected_db = f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/{postgres['POSTGRES_DB']}"
    assert args.db == expected_db

    allow = argv(found["autocert-allow"]["command"])
    allow_args = build_parser().parse_args(allow)
    assert allow_args.command == "allow" and option(allow, "--db") == expected_db
    assert "demo.autocert.test" in allow_args.names


def balancer_backends() -> dict[int, list[tuple[str, int]]]:
    """The balancer's frontends, by port, each with the servers its backend sends to."""
    frontends: dict[str, int] = {}
    backends: dict[str, list[tuple[str, int]]] = {}
    uses: dict[str, str] = {}
    section = ("", "")
    for line in BALANCER_CONFIG.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not line.startswith((" ", "\t")):
            section = (words[0], words[1] if len(words) > 1 else "")
        elif section[0] == "frontend" and words[0] == "bind":
            frontends[section[1]] = int(words[1].rsplit(":", 1)[1])
        elif section[0] == "frontend" and words[0] == "default_backend":
            uses[section[1]] = words[1]
        elif section[0] == "backend" and words[0] == "server":
            host, port = words[2].rsplit(":", 1)
            backends.setdefault(section[1], []).append((host, int(port)))
    return {port: backends[uses[frontend]] for frontend, port in frontends.items()}


def test_every_instance_shares_the_database_and_the_balancer_reaches_both() -> None:
    found = services()
    dbs = {settings(instance).db for instance in INSTANCES}
    assert len(dbs) == 1 and next(iter(dbs)).startswith("postgresql://") and "@postgres:" in next(iter(dbs))
    balancer = found["balancer"]
    assert ("bind", "./examples/compose/haproxy.cfg", "/usr/local/etc/haproxy/haproxy.cfg") in mounts(balancer)
    published = {int(port.rsplit(":", 2)[-1]) for port in balancer["ports"]}
    backends = balancer_backends()
    assert set(backends) == published, "the balancer must publish each port it balances"
    for instance in INSTANCES:
        serve = settings(instance)
        for label, listens in (("https", serve.https), ("http", serve.http)):
            (port,) = [int(listen.rsplit(":", 1)[1]) for listen in listens]
            assert (instance, port) in backends[port], f"the balancer does not send {label} to {instance}:{port}"
        assert balancer["networks"]["acme"]["ipv4_address"] in serve.trusted_proxies, f"{instance} must trust the balancer's PROXY header"
        assert set(found["balancer"]["depends_on"]) >= {instance}
    assert "send-proxy-v2" in BALANCER_CONFIG.read_text()


def test_pebble_validates_where_autocert_listens() -> None:
    """Pebble's validator reaches the balancer (DNS), on the ports it forwards to autocert's
    http-01 and tls-alpn-01 listeners."""
    found = services()
    config = json.loads((REPO / "examples/compose/pebble-config.json").read_text())["pebble"]
    backends = balancer_backends()
    for instance in INSTANCES:
        serve = settings(instance)
        assert [int(listen.rsplit(":", 1)[1]) for listen in serve.http] == [config["httpPort"]]
        assert [int(listen.rsplit(":", 1)[1]) for listen in serve.https] == [config["tlsPort"]]
        assert primary_issuer(serve)["directory"] == f"https://pebble:{config['listenAddress'].rsplit(':', 1)[1]}/dir"
    assert {config["httpPort"], config["tlsPort"]} <= set(backends)

    balancer_ip = found["balancer"]["networks"]["acme"]["ipv4_address"]
    challtestsrv = argv(found["challtestsrv"]["command"])
    assert option(challtestsrv, "-defaultIPv4") == balancer_ip, "DNS must send Pebble's validator to the balancer"
    assert option(challtestsrv, "-defaultIPv6") == ""
    dns_ip = found["challtestsrv"]["networks"]["acme"]["ipv4_address"]
    dns_port = option(challtestsrv, "-dns01").rsplit(":", 1)[1]
    assert option(argv(found["pebble"]["command"]), "-dnsserver") == f"{dns_ip}:{dns_port}"
    assert option(argv(found["pebble"]["command"]), "-config") == "/config/pebble-config.json"
    assert config["certificate"].startswith("/certs/") and config["privateKey"].startswith("/certs/")


# -- what can run here does run ------------------------------------------------------------------


def test_pebble_listener_certificate_script(tmp_path: Path) -> None:
    script = REPO / "examples/compose/pebble_certs.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    first = (tmp_path / "ca.pem").read_bytes()
    again = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and (tmp_path / "ca.pem").read_bytes() == first, "a restart must keep the trust anchor"
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(first)
    leaf = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "pebble" in names, "autocert reaches Pebble as https://pebble:14000"
    assert (tmp_path / "key.pem").is_file()


def test_debian_pebble_accepts_the_compose_config_and_certificate(tmp_path: Path) -> None:
    if shutil.which("pebble") is None:
        pytest.skip("pebble is not installed")
    certs = tmp_path / "certs"
    assert subprocess.run([sys.executable, str(REPO / "examples/compose/pebble_certs.py"), str(certs)], timeout=60).returncode == 0
    config = json.loads((REPO / "examples/compose/pebble-config.json").read_text())
    listen, management = free_port(), free_port()
    config["pebble"].update({
        "listenAddress": f"127.0.0.1:{listen}", "managementListenAddress": f"127.0.0.1:{management}",
        "certificate": str(certs / "cert.pem"), "privateKey": str(certs / "key.pem"),
        "httpPort": free_port(), "tlsPort": free_port(),
    })
    path = tmp_path / "pebble-config.json"
    path.write_text(json.dumps(config))
    log = tmp_path / "pebble.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(["pebble", "-config", str(path), "-dnsserver", f"127.0.0.1:{free_port()}"],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        answer: list[bytes] = []

        def directory() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"pebble exited: {log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", listen), timeout=5) as raw:
                    with context.wrap_socket(raw, server_hostname="pebble") as tls:
                        tls.sendall(b"GET /dir HTTP/1.1\r\nHost: pebble\r\nConnection: close\r\n\r\n")
                        answer.append(b"".join(iter(lambda: tls.recv(65536), b"")))
                        return True
            except ConnectionRefusedError:
                return False

        wait_for(directory, timeout=30, what="pebble to answer with the compose certificate")
        assert b"newNonce" in answer[-1]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_files_the_dockerfile_copies_build_the_wheel(tmp_path: Path) -> None:
    """``pip install .`` in the image sees only what COPY put there: that must be enough."""
    pytest.importorskip("hatchling")
    source = tmp_path / "src"
    source.mkdir()
    for sources, _destination in copy_sources(REPO / "Dockerfile"):
        for item in sources:
            origin = REPO / item
            if origin.is_dir():
                shutil.copytree(origin, source / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(origin, source / item)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("autocert-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "autocert/_cli.py" in names and "autocert/_proxy.py" in names and "autocert/web.py" in names
    assert any(name.startswith("autocert/_migrations/versions/") for name in names), "the migrations must ship in the wheel"
    instructions = dockerfile_instructions(REPO / "Dockerfile")
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("ENTRYPOINT", '["autocert"]') in instructions


def balancer_config_for(instances: list[ServeProcess], https_port: int, http_port: int) -> str:
    """The compose file's haproxy.cfg with loopback addresses for the service names and ports."""
    text = (REPO / "examples/compose/haproxy.cfg").read_text()
    text = text.replace("bind :8443\n", f"bind 127.0.0.1:{https_port}\n").replace("bind :8080\n", f"bind 127.0.0.1:{http_port}\n")
    for number, instance in enumerate(instances, 1):
        text = text.replace(f" autocert-{number}:8443\n", f" 127.0.0.1:{instance.https_port}\n")
        text = text.replace(f" autocert-{number}:8080\n", f" 127.0.0.1:{instance.http_port}\n")
    # Addresses need no resolver (and nothing may leave loopback).
    text = re.sub(r"\nresolvers compose\n(?:    .*\n)*", "\n", text).replace(" resolvers compose", "")
    assert "autocert-1:" not in text and "autocert-2:" not in text and "bind :" not in text, text
    return text


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (scripts/setup.sh installs it)")
def test_the_compose_balancer_spreads_over_both_instances_on_one_postgres(pebble: Pebble, postgres_url: str, root_ca: str,
                                                                          tmp_path: Path) -> None:
    """The compose file's balancer config, run here by Debian's haproxy in front of two real
    instances sharing one PostgreSQL database (as in the compose file): the CA's validations
    and the clients come through it, both instances serve, and each sees the client's own
    address from the PROXY header."""
    name = "balanced.example.test"
    assert run_cli("allow", name, db=postgres_url).returncode == 0  # creates the schema once
    instances = [ServeProcess(postgres_url, pebble, tmp_path, https_port=free_port(), http_port=free_port(),
                              extra=["--workers", "1", "--trusted-proxies", "127.0.0.1"]) for _ in range(2)]
    config = tmp_path / "haproxy.cfg"
    config.write_text(balancer_config_for(instances, pebble.tlsalpn01_port, pebble.http01_port))
    balancer = None
    try:
        for instance in instances:
            instance.start(timeout=120)
        with open(tmp_path / "haproxy.log", "wb") as log:
            balancer = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(pebble.tlsalpn01_port, timeout=5) and port_open(pebble.http01_port, timeout=5), timeout=60,
                 what="haproxy to listen")
        served_certificate(pebble.tlsalpn01_port, name, root_ca)  # a first contact, validated through the balancer
        for _ in range(20):
            assert fetch(pebble.tlsalpn01_port, name, root_ca, source="127.0.0.2") == 200
        for instance in instances:  # the access log is written in batches: wait for it
            try:
                wait_for(lambda: "127.0.0.2 [" in instance.stderr_path.read_text(), timeout=30, what="the client's requests in the log")
            except TimeoutError:
                raise AssertionError(f"an instance served no request of the client, or lost its address:\n{instance.output()}\n"
                                     f"--- haproxy\n{(tmp_path / 'haproxy.log').read_text()[-3000:]}") from None
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(timeout=30)
        for instance in instances:
            instance.stop()

