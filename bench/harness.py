"""What every benchmark driver here shares: servers as process groups, CPU read from /proc,
pinning, and the client processes that run side by side.

- servers are pinned to the last CPU and clients to the others (``SERVER_CPUS``,
  ``CLIENT_CPUS``), so a client never shares a core, or its caches, with what is measured;
- a server's CPU is user + system time of its own processes (every thread) from
  ``/proc/<pid>/stat``, read before and after a run;
- :func:`run_clients` starts the client processes (``bench/client.py``), lets them warm up,
  then starts them at once and reads every server's CPU around the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_sets() -> tuple[set[int], set[int]]:
    """(server CPUs, client CPUs): servers get the last CPU to themselves when there are two
    or more, so clients never share a core (and its caches) with the process being measured."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[-1]}, set(cpus[:-1])


SERVER_CPUS, CLIENT_CPUS = cpu_sets()


def pin(pid: int, cpus: set[int]) -> None:
    """Pin a process and every thread it has now (threads started later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> tuple[float, float]:
    """Current and peak resident set size (VmRSS, VmHWM) in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...), not ``pid`` itself."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a live (not zombie) member."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def probed(argv: Sequence[str], ports: Sequence[int]) -> list[str]:
    """``argv`` under a shell that prints ``ready`` once every port accepts a TCP connection,
    for servers that print nothing when they are ready (nginx, Caddy). The server is then a
    child of the shell: measure :func:`descendants` of the shell, stop the whole group."""
    command = shlex.join(argv)
    probes = "; ".join(f"until (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; do sleep 0.05; done" for port in ports)
    return ["bash", "-c", f"{command} & pid=$!; {probes}; echo ready; wait $pid"]


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def nginx_server(label: str, binary: str, prefix: Path, http: str, ports: Sequence[int], *, master: bool = True,
                 head: str = "", tail: str = "", cpus: set[int] | None = None, workers: str = "1") -> Server | None:
    """nginx in the foreground with ``workers`` worker processes (one unless told otherwise:
    ``auto`` is one per CPU) and everything under ``prefix``: ``http`` is
    the inside of its ``http`` block, ``head`` and ``tail`` stand before and after it. None,
    said in one line, when ``nginx -t`` rejects the configuration."""
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{head}
worker_processes {workers};
daemon off;
master_process {'on' if master else 'off'};
error_log {prefix}/logs/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
{http}
}}
{tail}""")
    check = subprocess.run([binary, "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        lines = [line for line in check.stderr.splitlines() if "emerg" in line or "failed" in line] or [check.stderr.strip()]
        print(f"{label} skipped: its configuration test failed: {lines[0]}", file=sys.stderr)
        return None
    server = Server(label, probed([binary, "-p", str(prefix), "-c", str(conf)], ports), ports[0], "ready")
    if cpus is not None:
        server.cpus = cpus
    return server


def caddy_server(label: str, binary: str, home: Path, sites: str, ports: Sequence[int], *, env: dict[str, str] | None = None) -> Server:
    """Caddy in the foreground from a Caddyfile of ``sites`` (its admin endpoint and automatic
    HTTPS off, HTTP/1.1 and HTTP/2), with its home and data under ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    caddyfile = home / "Caddyfile"
    caddyfile.write_text(f"""{{
	admin off
	auto_https off
	servers {{
		protocols h1 h2
	}}
}}
{sites}""")
    argv = probed([binary, "run", "--config", str(caddyfile), "--adapter", "caddyfile"], ports)
    paths = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data")}
    return Server(label, argv, ports[0], "ready", env={**paths, **(env or {})})


@dataclass
class Server:
    label: str
    argv: list[str]
    port: int
    ready_text: str
    env: dict[str, str] = field(default_factory=dict)
    cpus: set[int] = field(default_factory=lambda: SERVER_CPUS)
    process: subprocess.Popen[str] | None = None
    terminated: bool = False
    #: stderr goes to a file: a pipe nobody reads would stall a server that logs a lot.
    stderr_path: Path | None = None

    def launch(self) -> None:
        """Start the process (its own process group) without waiting for it to listen."""
        if self.stderr_path is None:
            self.stderr_path = Path(tempfile.mkstemp(prefix=f"bench-{self.label}-", suffix=".err")[1])
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                            env={**os.environ, **self.env}, start_new_session=True)
        os.sched_setaffinity(self.process.pid, self.cpus)  # before it has started any thread

    def wait_ready(self, timeout: float = 120) -> None:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                self.process.wait()
                raise RuntimeError(f"{self.label} exited with {self.process.returncode}:\n{self.stderr_tail()}")
            if self.ready_text in line:
                return
        raise RuntimeError(f"{self.label} did not start within {timeout} s")

    def start(self, timeout: float = 120) -> float:
        """Start and wait until it listens; returns the seconds that took."""
        started = time.perf_counter()
        self.launch()
        self.wait_ready(timeout)
        return time.perf_counter() - started

    def start_probed(self, name: str, timeout: float = 120) -> tuple[float, float, float]:
        """Start while probing the port: seconds until it accepts a TCP connection, until the
        ready line, and until a handshake made on that first connection is answered."""
        from client import client_context

        started = time.perf_counter()
        ready_at: list[float] = []

        def watch() -> None:
            ready_at.append(self.start(timeout) + started)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.label} never accepted a connection") from None
                time.sleep(0.002)
        accepted = time.perf_counter()
        with client_context().wrap_socket(raw, server_hostname=name):
            answered = time.perf_counter()
        watcher.join(timeout)
        return accepted - started, ready_at[0] - started, answered - started

    def stderr_tail(self) -> str:
        return self.stderr_path.read_text()[-3000:] if self.stderr_path and self.stderr_path.exists() else ""

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.label} exited with {self.process.returncode}:\n{self.stderr_tail()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def terminate(self) -> None:
        """SIGTERM to the whole group, without waiting: nginx and Caddy run under a probing
        shell, and SIGTERM to the shell alone would leave them running."""
        if self.process is not None and self.process.poll() is None:
            self.terminated = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        """Terminate the group and wait for it; SIGKILL what is left after 15 s. The stderr
        file stays when the server had exited by itself or had to be killed."""
        if self.process is None:
            return
        exited_by_itself = self.process.poll() is not None and not self.terminated
        self.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return  # its stderr file stays for a look at what went wrong
        # The shell is gone; what ran under it may still be finishing its own shutdown. Only a
        # group that still has members is signalled: an empty one's number may be reused.
        deadline = time.monotonic() + 10
        while group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_alive(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if self.stderr_path is not None and not exited_by_itself:
            self.stderr_path.unlink(missing_ok=True)


def stop_servers(servers: Sequence[Server]) -> None:
    """SIGTERM to every server first, so they drain at the same time, then wait for each."""
    for server in servers:
        server.terminate()
    for server in servers:
        server.stop()


def print_table(markdown: str, path: Path | None) -> None:
    """A driver's result: printed, and written to ``path`` (``--markdown``) when given."""
    print(markdown)
    if path is not None:
        path.write_text(markdown + "\n")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so the drivers' ``finally`` stops every server then too."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


Pids = int | Sequence[int] | None


def _cpu(pids: Pids) -> float:
    if pids is None:
        return 0.0
    return sum(cpu_seconds(pid) for pid in ([pids] if isinstance(pids, int) else pids))


def run_clients(targets: Mapping[str, tuple[int, Pids]], count: int, *, clients: int = 2, extra: Sequence[str] = (),
                warmup: int = 50) -> tuple[dict[str, tuple[int, int, float]], float]:
    """Run client processes at once; each sends ``count`` connections to every target in turn.

    ``targets`` maps a label to (port, the pid or pids to measure, or None). Returns, per
    label, (ok, failed, server CPU seconds over the run), and the run's wall time.
    """
    ports = ",".join(str(port) for port, _ in targets.values())
    argv = [sys.executable, str(HERE / "client.py"), "--ports", ports, "--count", str(count), "--warmup", str(warmup), *extra]
    processes = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    for process in processes:
        os.sched_setaffinity(process.pid, CLIENT_CPUS)
    try:
        for process in processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a client failed during warm-up")
        before = {label: _cpu(pids) for label, (_, pids) in targets.items()}
        started = time.perf_counter()
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [json.loads(process.stdout.readline())["results"] for process in processes if process.stdout]
        after = {label: _cpu(pids) for label, (_, pids) in targets.items()}
        wall = time.perf_counter() - started
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    measured = {}
    for label, (port, _) in targets.items():
        ok = sum(result[str(port)][0] for result in results)
        failed = sum(result[str(port)][1] for result in results)
        measured[label] = (ok, failed, after[label] - before[label])
    return measured, wall
