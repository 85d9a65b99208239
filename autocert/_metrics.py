"""Prometheus metrics for one manager, in a registry of its own.

A per-manager ``CollectorRegistry`` (not prometheus_client's global one) keeps two managers in
one process, or a test run, from mixing their numbers, and keeps autocert from publishing
anything in an embedding application's own ``/metrics`` unless asked.

The handshake path never touches prometheus_client: it bumps plain integers
(``Manager.handshakes``, the context cache's hit and miss counts) that a collector reads at
scrape time, as it does the counts of events (issued, failed, ...). ACME request timings are
pushed as they happen. Under ``serve --workers``, the worker serving the admin listener
reports the sums over every worker (:mod:`autocert._board`); the ACME timings stay its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from collections.abc import Iterator
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._board import FIGURES, HANDSHAKE_OUTCOMES, Board
from ._errors import AutocertError
from ._events import EVENT_KINDS, Event
from ._monitor import ExpiryMonitor

if TYPE_CHECKING:
    from ._manager import Manager

__all__ = ["HANDSHAKE_OUTCOMES", "Metrics"]

#: How often a worker copies its figures to the shared board.
PUBLISH_INTERVAL = 1.0

#: ACME requests take milliseconds against a local CA and seconds against a busy public one.
ACME_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics of one manager; get it with :meth:`of` so every user shares one registry."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.monitor = ExpiryMonitor.of(manager)
        self.registry = CollectorRegistry()
        #: Finished issuance attempts by result, and events by kind: plain ints read at scrape time.
        self.attempts: collections.Counter[str] = collections.Counter()
        self.events: collections.Counter[str] = collections.Counter()
        self.acme_latency = Histogram(
            "autocert_acme_request_duration_seconds",
            "Latency of HTTP requests to the ACME server, by method.",
            ["method"],
            buckets=ACME_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(self))
        manager.events.subscribe(self._on_event)
        manager.acme_trace_configs.append(self._trace_config())

    @classmethod
    def of(cls, manager: Manager) -> Metrics:
        """The metrics of ``manager``, created on first use. Its ACME latency hook applies to
        the ACME client the manager creates for its first order, so get it before then."""
        metrics = manager.attachments.get(cls)
        if metrics is None:
            metrics = manager.attachments[cls] = cls(manager)
        return metrics  # type: ignore[no-any-return]

    def _on_event(self, event: Event) -> None:
        self.events[event.kind] += 1
        if event.kind in ("issued", "renewed"):
            self.attempts["valid"] += 1
        elif event.kind == "failed":
            self.attempts["failed"] += 1

    def local_figures(self) -> list[float]:
        """This process's figures, in the order of :data:`autocert._board.FIGURES`."""
        manager = self.manager
        try:
            in_flight = len(manager.worker.in_flight)
        except AutocertError:  # not started: nothing is in flight
            in_flight = 0
        cache = manager.cache
        values = {
            **{f"handshakes:{outcome}": manager.handshakes.get(outcome, 0) for outcome in HANDSHAKE_OUTCOMES},
            **{f"attempts:{result}": self.attempts[result] for result in ("valid", "failed")},
            **{f"events:{kind}": self.events[kind] for kind in EVENT_KINDS},
            "cache_hits": cache.hits, "cache_misses": cache.misses,
            "cache_size": len(cache), "cache_capacity": cache.max_size, "in_flight": in_flight,
        }
        return [float(values[key]) for key in FIGURES]

    def figures(self) -> dict[str, float]:
        """What a scrape reports: this process's figures, or under ``serve --workers`` the
        sums over every worker (this one's copied first, so they are current)."""
        board = self.manager.attachments.get(Board)
        if board is None:
            return dict(zip(FIGURES, self.local_figures()))
        board.publish(self.local_figures())
        return board.total()  # type: ignore[no-any-return]

    async def publish(self, board: Board) -> None:
        """Copy this process's figures to its slot of ``board`` every second until cancelled,
        and once more then, so the supervisor keeps what it counted to the end."""
        try:
            while True:
                board.publish(self.local_figures())
                await asyncio.sleep(PUBLISH_INTERVAL)
        finally:
            board.publish(self.local_figures())

    def _trace_config(self) -> aiohttp.TraceConfig:
        """Times every ACME request from send to response headers (errors count too)."""
        trace = aiohttp.TraceConfig()
        loop_time = _loop_time

        async def on_start(_session: aiohttp.ClientSession, context: SimpleNamespace, _params: Any) -> None:
            context.autocert_started = loop_time()

        async def on_done(_session: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
            started = getattr(context, "autocert_started", None)
            if started is not None:
                self.acme_latency.labels(params.method).observe(loop_time() - started)

        trace.on_request_start.append(on_start)
        trace.on_request_end.append(on_done)
        trace.on_request_exception.append(on_done)
        return trace

    async def render(self) -> bytes:
        """The exposition text; refreshes the expiry figures first when they are stale."""
        with contextlib.suppress(AutocertError):  # not started: report what is known
            await self.monitor.refresh_if_stale()
        return generate_latest(self.registry)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class _LiveCollector(Collector):
    """Figures read from the manager at scrape time rather than pushed."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        manager = self._metrics.manager
        figures = self._metrics.figures()
        handshakes = CounterMetricFamily("autocert_handshakes", "TLS handshakes by outcome.", labels=["outcome"])
        for outcome in HANDSHAKE_OUTCOMES:
            handshakes.add_metric([outcome], figures[f"handshakes:{outcome}"])
        if manager.attachments.get(Board) is None:  # outcomes the board has no place for
            for outcome in sorted(set(manager.handshakes) - set(HANDSHAKE_OUTCOMES)):
                handshakes.add_metric([outcome], manager.handshakes[outcome])
        yield handshakes
        attempts = CounterMetricFamily("autocert_issuance_attempts", "Issuance attempts finished, by result.", labels=["result"])
        for result in ("valid", "failed"):
            attempts.add_metric([result], figures[f"attempts:{result}"])
        yield attempts
        events = CounterMetricFamily("autocert_events", "Events emitted, by kind.", labels=["event"])
        for kind in EVENT_KINDS:
            events.add_metric([kind], figures[f"events:{kind}"])
        yield events

        yield GaugeMetricFamily("autocert_context_cache_size", "TLS contexts held in memory.", value=figures["cache_size"])
        yield GaugeMetricFamily("autocert_context_cache_capacity", "Most TLS contexts held in memory (--cache-size).",
                                value=figures["cache_capacity"])
        hits, misses = figures["cache_hits"], figures["cache_misses"]
        yield CounterMetricFamily("autocert_context_cache_hits", "Context cache lookups that found a context.", value=hits)
        yield CounterMetricFamily("autocert_context_cache_misses", "Context cache lookups that did not.", value=misses)
        yield GaugeMetricFamily(
            "autocert_context_cache_hit_ratio", "Hits over lookups since start (NaN before the first lookup).",
            value=hits / (hits + misses) if hits + misses else math.nan,
        )
        yield GaugeMetricFamily("autocert_issuance_in_flight", "Orders running or queued.", value=figures["in_flight"])
        yield from self._workers(figures)

        monitor = self._metrics.monitor
        yield GaugeMetricFamily("autocert_certificates", "Allowed names with a current certificate.", value=monitor.certified)
        soonest = monitor.soonest
        if soonest is not None:
            seconds = (soonest - datetime.now(timezone.utc)).total_seconds()
            yield GaugeMetricFamily(
                "autocert_certificate_soonest_expiry_seconds",
                "Seconds until the earliest not_after among current certificates (negative: already expired).",
                value=seconds,
            )


    def _workers(self, figures: dict[str, float]) -> Iterator[Metric]:
        """How many processes serve, and under ``--workers`` how many handshakes each did."""
        board: Board | None = self._metrics.manager.attachments.get(Board)
        yield GaugeMetricFamily("autocert_workers", "Worker processes serving.", value=1 if board is None else board.running())
        if board is None:
            return
        per_worker = CounterMetricFamily("autocert_worker_handshakes", "TLS handshakes by worker process (every outcome).",
                                         labels=["worker", "pid"])
        for slot, pid, values in board.per_worker():
            per_worker.add_metric([str(slot), str(pid)], sum(values[f"handshakes:{outcome}"] for outcome in HANDSHAKE_OUTCOMES))
        yield per_worker
