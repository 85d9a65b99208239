"""autocert's request path against nginx and Caddy, side by side: server CPU per request.

    .venv/bin/python bench/peers.py [--rounds 3] [--count 4000] [--keepalive 40x200] [--large 20x50]
                                    [--quick] [--no-nginx] [--no-caddy] [--markdown FILE]

Every server gets the same ECDSA P-256 certificate and proxies to the same upstream (a static
nginx on loopback, or bench/upstream.py without nginx), and only the CPU of the proxy's own
processes is counted. Rows (per request, TLS 1.3, no resumption):

1. a new TLS connection carrying one proxied GET (2-byte body);
2. keep-alive proxied GETs of the 2-byte body (``--keepalive`` connections × requests);
3. keep-alive proxied GETs of a 256 KiB body (``--large``);
4. the TLS handshake alone (the client closes right after it);
5. a new TLS connection carrying one GET the server answers itself (no upstream);
6. a new TLS connection carrying one GET through a TCP pass-through (TLS terminated, bytes
   relayed to the upstream's port): nginx's ``stream`` module when this build has it, autocert
   ``--upstream tcp://`` when this autocert has it; Caddy has no built-in equivalent.

Prints one Markdown table (µs of server CPU per request, medians over the rounds, and the
ratios autocert ÷ Caddy and autocert ÷ nginx with their range over the rounds), then the
handshake alone of two Python floors measured in the same rounds (bench/floor_server.py: what
uvloop's own TLS server and a blocking ``SSLSocket`` loop cost, with nothing of autocert's).
See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The bench's siblings, and the autocert of this checkout (for the database it seeds), whichever
# one is installed; the servers it starts get the same through PYTHONPATH.
sys.path[:0] = [str(HERE), str(HERE.parent)]

from fixtures import UNREACHABLE_CA, Chain, build_database, make_chain, name_for
from harness import (CLIENT_CPUS, SERVER_CPUS, Server, caddy_server, descendants, free_port, nginx_binary, nginx_server, pin,
                     print_table, run_clients, stop_servers, terminate_as_interrupt)

NAME = name_for(0)
SMALL_PATH, LARGE_PATH = "/small", "/large"
SMALL_SIZE, LARGE_SIZE = 2, 256 * 1024
CLIENTS = 2
PEERS = ("nginx", "Caddy", "autocert")
#: Python's floors for the handshake alone (bench/floor_server.py), as peers with only that row.
FLOORS = {"uvloop floor": "uvloop", "blocking floor": "blocking"}
#: serve's exit status for a usage error: what an ``--upstream`` it does not understand gets.
EXIT_USAGE = 2


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    listener: str  # which of a peer's listeners: "proxy", "own" or "tcp"
    path: str | None  # None: handshake alone
    connections: int  # per server and round, over all client processes
    requests: int = 1
    expect_size: int | None = None


def rows(args: argparse.Namespace) -> list[Row]:
    (keep_connections, keep_requests), (large_connections, large_requests) = args.keepalive, args.large
    return [
        Row("connect", "new TLS connection + 1 proxied GET (2 B)", "proxy", SMALL_PATH, args.count, 1, SMALL_SIZE),
        Row("keepalive", f"keep-alive proxied GET, 2 B ({keep_connections} × {keep_requests})", "proxy", SMALL_PATH,
            keep_connections, keep_requests, SMALL_SIZE),
        Row("large", f"keep-alive proxied GET, 256 KiB ({large_connections} × {large_requests})", "proxy", LARGE_PATH,
            large_connections, large_requests, LARGE_SIZE),
        Row("handshake", "TLS handshake alone", "proxy", None, args.count),
        Row("own", "new TLS connection + 1 GET answered by the server itself", "own", SMALL_PATH, args.count),
        Row("tcp", "new TLS connection + 1 GET through TCP pass-through", "tcp", SMALL_PATH, args.count, 1, SMALL_SIZE),
    ]


@dataclass
class Peer:
    """One server product: the processes it runs, which of them answers each listener, and
    why a listener it lacks is missing."""

    label: str
    servers: list[Server] = field(default_factory=list)
    #: listener ("proxy", "own", "tcp") -> (the process answering it, its port)
    listeners: dict[str, tuple[Server, int]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    #: the pids whose CPU counts, per server label, filled in once started
    pids: dict[str, list[int]] = field(default_factory=dict)


def measured_pids(server: Server) -> list[int]:
    """The server's own processes: those under the probing shell (nginx master and workers,
    Caddy), or the process itself."""
    return descendants(server.pid) if server.argv[0] == "bash" else [server.pid]


# --- the upstream ---------------------------------------------------------------------------


def upstream_server(workdir: Path, nginx: str | None) -> Server:
    """A static server with /small (2 bytes) and /large (256 KiB), on the clients' CPUs."""
    port = free_port()
    if nginx is None:
        return Server("upstream", [sys.executable, str(HERE / "upstream.py"), "--port", str(port)], port, "ready",
                      cpus=CLIENT_CPUS)
    prefix = workdir / "upstream"
    root = prefix / "root"
    root.mkdir(parents=True)
    (root / "small").write_bytes(b"ok")
    (root / "large").write_bytes(b"x" * LARGE_SIZE)
    server = nginx_server("upstream", nginx, prefix, f"""
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        keepalive_timeout 600s;
        root {root};
    }}""", [port], master=False, cpus=CLIENT_CPUS)
    if server is None:
        raise RuntimeError("the upstream nginx configuration failed its test")
    return server


# --- the peers ------------------------------------------------------------------------------


def nginx_stream_module(binary: str) -> tuple[str | None, str]:
    """(what the configuration needs to load the stream module, or None if there is none; why not)."""
    configure = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False).stderr
    if re.search(r"--with-stream(\s|$)", configure):
        return "", ""
    match = re.search(r"--modules-path=(\S+)", configure)
    module = Path(match.group(1) if match else "/usr/lib/nginx/modules") / "ngx_stream_module.so"
    if "--with-stream=dynamic" in configure and module.exists():
        return f"load_module {module};", ""
    return None, "this nginx has no stream module"


def nginx_peer(workdir: Path, binary: str, upstream: int) -> Peer | None:
    proxy, own = free_port(), free_port()
    load, why_not = nginx_stream_module(binary)
    tls = f"ssl_certificate {workdir}/chain.pem; ssl_certificate_key {workdir}/key.pem; ssl_protocols TLSv1.2 TLSv1.3;"
    stream, tcp = "", None
    if load is not None:
        tcp = free_port()
        stream = f"""stream {{
    server {{
        listen 127.0.0.1:{tcp} ssl;
        {tls}
        proxy_pass 127.0.0.1:{upstream};
    }}
}}"""
    server = nginx_server("nginx", binary, workdir / "nginx", f"""
    {tls}
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{proxy} ssl;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
    server {{
        listen 127.0.0.1:{own} ssl;
        location / {{ return 200 "ok\\n"; }}
    }}""", [proxy, own] + ([tcp] if tcp else []), head=load or "", tail=stream)
    if server is None:
        return None
    peer = Peer("nginx", [server], {"proxy": (server, proxy), "own": (server, own)})
    if tcp:
        peer.listeners["tcp"] = (server, tcp)
    else:
        peer.missing["tcp"] = why_not
    return peer


def caddy_peer(workdir: Path, binary: str, upstream: int) -> Peer:
    proxy, own = free_port(), free_port()
    tls = f"tls {workdir}/chain.pem {workdir}/key.pem"
    sites = f"""https://:{proxy} {{
	bind 127.0.0.1
	{tls}
	reverse_proxy 127.0.0.1:{upstream}
}}
https://:{own} {{
	bind 127.0.0.1
	{tls}
	respond "ok" 200
}}
"""
    # Go sizes its scheduler from the CPUs it may use when it starts: say so rather than race the pinning.
    server = caddy_server("Caddy", binary, workdir / "caddy", sites, [proxy, own], env={"GOMAXPROCS": str(len(SERVER_CPUS))})
    return Peer("Caddy", [server], {"proxy": (server, proxy), "own": (server, own)}, {"tcp": "no built-in equivalent"})


def autocert_peer(workdir: Path, chain: Chain, upstream: int) -> Peer:
    """Three ``serve`` processes: proxying to the upstream's URL, answering itself, and relaying
    TCP to the upstream's port; each with its own copy of a database holding the certificate."""
    seeded = workdir / "autocert.db"
    build_database(seeded, 10, chain, UNREACHABLE_CA)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    peer = Peer("autocert")
    for listener, extra in (("proxy", ["--upstream", f"http://127.0.0.1:{upstream}"]), ("own", []),
                            ("tcp", ["--upstream", f"tcp://127.0.0.1:{upstream}"])):
        db = workdir / f"autocert-{listener}.db"
        shutil.copyfile(seeded, db)
        port = free_port()
        argv = [sys.executable, "-m", "autocert", "--db", f"sqlite:///{db}", "serve", "--https", f"127.0.0.1:{port}",
                "--http", "none", "--admin", "none", "--directory", UNREACHABLE_CA, *extra]
        server = Server(f"autocert {listener}", argv, port, "https listening", env=env)
        peer.servers.append(server)
        peer.listeners[listener] = (server, port)
    return peer


def floor_peers(workdir: Path) -> list[Peer]:
    """The Python floors: each a peer with one listener, measured in the handshake row only."""
    peers = []
    for label, kind in FLOORS.items():
        port = free_port()
        argv = [sys.executable, str(HERE / "floor_server.py"), kind, str(port), str(workdir / "chain.pem"), str(workdir / "key.pem")]
        server = Server(label, argv, port, "floor listening")
        peers.append(Peer(label, [server], {"handshake": (server, port)}))
    return peers


def start(peers: list[Peer]) -> None:
    """Start every peer's processes at once, on every CPU, then pin each to the servers' CPU
    once it is ready (every thread it has; later ones inherit it). An autocert that refuses
    ``--upstream tcp://`` as a usage error loses that listener, and says so."""
    for peer in peers:
        for server in peer.servers:
            server.cpus = SERVER_CPUS | CLIENT_CPUS
            server.launch()
    for peer in peers:
        for server in list(peer.servers):
            try:
                server.wait_ready()
            except RuntimeError:
                assert server.process is not None
                tcp = peer.listeners.get("tcp", (None, 0))[0]
                if peer.label == "autocert" and server is tcp and server.process.returncode == EXIT_USAGE:
                    said = server.stderr_tail().strip().splitlines()
                    print(f"autocert serve --upstream tcp://: not supported by this autocert ({said[-1] if said else 'usage error'})",
                          file=sys.stderr)
                    assert server.stderr_path is not None
                    server.stderr_path.unlink(missing_ok=True)
                    peer.servers.remove(server)
                    del peer.listeners["tcp"]
                    peer.missing["tcp"] = "not supported by this autocert"
                    continue
                raise
            peer.pids[server.label] = measured_pids(server)
            for pid in peer.pids[server.label]:
                pin(pid, SERVER_CPUS)


# --- the rounds -----------------------------------------------------------------------------


def measure(peers: list[Peer], row: Row, warmup: int) -> dict[str, float]:
    """One run of ``row``, every peer that has its listener in turn: µs of CPU per request.
    Each client first makes about ``warmup`` requests per server that are not counted."""
    targets = {}
    for peer in peers:
        listener = "handshake" if row.key == "handshake" and "handshake" in peer.listeners else row.listener
        if listener in peer.listeners:
            server, port = peer.listeners[listener]
            targets[peer.label] = (port, peer.pids[server.label])
    if not targets:
        return {}
    extra = ["--names", "1"]
    if row.path is not None:
        extra += ["--path", row.path, "--requests", str(row.requests)]
        if row.expect_size is not None:
            extra += ["--expect-size", str(row.expect_size)]
    try:
        measured, _ = run_clients(targets, max(row.connections // CLIENTS, 1), clients=CLIENTS, extra=extra,
                                  warmup=max(1, warmup // row.requests))
    except (RuntimeError, ValueError):
        for peer in peers:
            for server in peer.servers:
                server.check_alive()
        raise
    result = {}
    for label, (ok, failed, cpu) in measured.items():
        if failed:
            raise RuntimeError(f"{row.title}: {label} answered {ok} connections and failed {failed}")
        result[label] = cpu / (ok * row.requests) * 1e6
    return result


def report(table: list[Row], per_round: dict[str, dict[str, list[float]]], peers: dict[str, Peer], skipped: dict[str, str],
           args: argparse.Namespace) -> str:
    def cell(row: Row, label: str) -> str:
        values = per_round[row.key].get(label)
        if values:
            median = statistics.median(values)
            return f"{median:.0f}" if median >= 100 else f"{median:.1f}"
        if label in skipped:
            return skipped[label]
        return peers[label].missing.get(row.listener, "—")

    def ratio(row: Row, base: str) -> str:
        ours, theirs = per_round[row.key].get("autocert"), per_round[row.key].get(base)
        if not ours or not theirs:
            return ""
        return _ratio(ours, theirs) or "under a clock tick"

    lines = [
        f"µs of server CPU per request, median of {args.rounds} round(s); in brackets the range of the per-round ratios. "
        f"{CLIENTS} client processes, TLS 1.3, ECDSA P-256, no resumption; servers pinned to CPU {sorted(SERVER_CPUS)}, "
        f"clients and upstream to {sorted(CLIENT_CPUS)}.",
        "",
        "| request | nginx µs | Caddy µs | autocert µs | autocert ÷ Caddy | autocert ÷ nginx |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(f"| {row.title} | {cell(row, 'nginx')} | {cell(row, 'Caddy')} | {cell(row, 'autocert')} | "
                     f"{ratio(row, 'Caddy')} | {ratio(row, 'nginx')} |")
    tcp = [label for label in PEERS if per_round["tcp"].get(label)]
    lines += ["", f"TCP pass-through measured for: {', '.join(tcp) if tcp else 'none'}."]
    floors = [label for label in FLOORS if per_round["handshake"].get(label)]
    if floors:
        lines += ["", "The TLS handshake alone, the same rounds, Python's floors (bench/floor_server.py) beside the servers:", "",
                  "| server | µs | ÷ Caddy | ÷ nginx |", "|---|---|---|---|"]
        handshake = next(row for row in table if row.key == "handshake")
        for label in ["autocert", *floors]:
            values = per_round["handshake"].get(label)
            if values:
                versus = [_ratio(values, per_round["handshake"].get(base)) for base in ("Caddy", "nginx")]
                lines.append(f"| {label} | {cell(handshake, label)} | {versus[0]} | {versus[1]} |")
    return "\n".join(lines)


def _ratio(ours: list[float], theirs: list[float] | None) -> str:
    """The median of the per-round ratios, with their range."""
    ratios = [a / b for a, b in zip(ours, theirs or []) if b]
    if not ratios:
        return ""
    spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.2f}{spread}"


def size_pair(text: str) -> tuple[int, int]:
    connections, _, requests = text.partition("x")
    try:
        pair = int(connections), int(requests)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CONNECTIONSxREQUESTS, e.g. 40x200") from None
    if min(pair) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both numbers must be at least 1")
    return pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="repeats of every row; medians are reported (3)")
    parser.add_argument("--count", "--connections", type=int, default=4000,
                        help="new connections per server and round, for the rows that open one per request (4000)")
    parser.add_argument("--keepalive", type=size_pair, default=(40, 200), metavar="CxR",
                        help="keep-alive row, 2-byte body: connections × requests per server and round (40x200)")
    parser.add_argument("--large", type=size_pair, default=(20, 50), metavar="CxR",
                        help="keep-alive row, 256 KiB body: connections × requests per server and round (20x50)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one round of 100 connections, 4x25 and 2x10 (overrides the counts above)")
    parser.add_argument("--no-nginx", action="store_true", help="no nginx at all: neither as a peer nor as the upstream")
    parser.add_argument("--no-caddy", action="store_true")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.count, args.keepalive, args.large = 1, 100, (4, 25), (2, 10)
    warmup = 5 if args.quick else 20

    workdir = Path(tempfile.mkdtemp(prefix="autocert-peers-"))
    started: list[Server] = []
    try:
        with terminate_as_interrupt():
            chain = make_chain(NAME)
            chain.write(workdir)
            skipped: dict[str, str] = {}
            nginx = None if args.no_nginx else nginx_binary()
            caddy = None if args.no_caddy else shutil.which("caddy")
            if args.no_nginx:
                skipped["nginx"] = "skipped (--no-nginx)"
            elif nginx is None:
                skipped["nginx"] = "not installed"
                print("nginx is not installed: its column is skipped and the upstream is bench/upstream.py "
                      "(apt-get install nginx-light)", file=sys.stderr)
            if args.no_caddy:
                skipped["Caddy"] = "skipped (--no-caddy)"
            elif caddy is None:
                skipped["Caddy"] = "not installed"
                print("caddy is not installed: its column is skipped (apt-get install caddy)", file=sys.stderr)

            began = time.perf_counter()
            upstream = upstream_server(workdir, nginx)
            started.append(upstream)
            upstream.start()
            for pid in measured_pids(upstream):
                pin(pid, CLIENT_CPUS)
            peers: list[Peer] = []
            if nginx is not None:
                peer = nginx_peer(workdir, nginx, upstream.port)
                if peer is None:
                    skipped["nginx"] = "configuration failed"
                else:
                    peers.append(peer)
            if caddy is not None:
                peers.append(caddy_peer(workdir, caddy, upstream.port))
            peers.append(autocert_peer(workdir, chain, upstream.port))
            peers += floor_peers(workdir)
            started += [server for peer in peers for server in peer.servers]
            print(f"upstream and database ready in {time.perf_counter() - began:.1f} s", file=sys.stderr)
            start(peers)
            print(f"{', '.join(peer.label for peer in peers)} ready in {time.perf_counter() - began:.1f} s", file=sys.stderr)

            table = rows(args)
            per_round: dict[str, dict[str, list[float]]] = {row.key: {} for row in table}
            for round_index in range(args.rounds):
                for row in table:
                    began = time.perf_counter()
                    measured = measure(peers, row, warmup)
                    for label, value in measured.items():
                        per_round[row.key].setdefault(label, []).append(value)
                    done = f"done in {time.perf_counter() - began:.1f} s" if measured else "no server has this listener"
                    print(f"round {round_index + 1}/{args.rounds}: {row.key} {done}", file=sys.stderr)
            markdown = report(table, per_round, {peer.label: peer for peer in peers}, skipped, args)
            print_table(markdown, args.markdown)
    finally:
        stop_servers(started)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
