"""Prometheus metrics for one manager, in a registry of its own.

A per-manager ``CollectorRegistry`` (not prometheus_client's global one) keeps two managers in
one process, or a test run, from mixing their numbers, and keeps autocert from publishing
anything in an embedding application's own ``/metrics`` unless asked.

The handshake path never touches prometheus_client: it bumps plain integers
(``Manager.handshakes``, the context cache's hit and miss counts) that a collector reads at
scrape time. Events (issued, failed, ...) and ACME request timings are pushed as they happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._errors import AutocertError
from ._events import EVENT_KINDS, Event
from ._monitor import ExpiryMonitor

if TYPE_CHECKING:
    from ._manager import Manager

__all__ = ["HANDSHAKE_OUTCOMES", "Metrics"]

#: Every outcome a handshake is counted under; all are exported, zeros included, so a
#: dashboard can rely on the series existing.
HANDSHAKE_OUTCOMES = ("served", "unknown_name", "held", "pending", "challenge")

#: ACME requests take milliseconds against a local CA and seconds against a busy public one.
ACME_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics of one manager; get it with :meth:`of` so every user shares one registry."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.monitor = ExpiryMonitor.of(manager)
        self.registry = CollectorRegistry()
        self.attempts = Counter(
            "autocert_issuance_attempts", "Issuance attempts finished by this process, by result.", ["result"], registry=self.registry
        )
        self.events = Counter("autocert_events", "Events emitted by this process, by kind.", ["event"], registry=self.registry)
        self.acme_latency = Histogram(
            "autocert_acme_request_duration_seconds",
            "Latency of HTTP requests to the ACME server, by method.",
            ["method"],
            buckets=ACME_LATENCY_BUCKETS,
            registry=self.registry,
        )
        for result in ("valid", "failed"):
            self.attempts.labels(result)
        for kind in EVENT_KINDS:
            self.events.labels(kind)
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
        self.events.labels(event.kind).inc()
        if event.kind in ("issued", "renewed"):
            self.attempts.labels("valid").inc()
        elif event.kind == "failed":
            self.attempts.labels("failed").inc()

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
        handshakes = CounterMetricFamily("autocert_handshakes", "TLS handshakes by outcome.", labels=["outcome"])
        counts = manager.handshakes
        for outcome in (*HANDSHAKE_OUTCOMES, *sorted(set(counts) - set(HANDSHAKE_OUTCOMES))):
            handshakes.add_metric([outcome], counts.get(outcome, 0))
        yield handshakes

        cache = manager.cache
        yield GaugeMetricFamily("autocert_context_cache_size", "TLS contexts held in memory.", value=len(cache))
        yield GaugeMetricFamily("autocert_context_cache_capacity", "Most TLS contexts held in memory (--cache-size).", value=cache.max_size)
        yield CounterMetricFamily("autocert_context_cache_hits", "Context cache lookups that found a context.", value=cache.hits)
        yield CounterMetricFamily("autocert_context_cache_misses", "Context cache lookups that did not.", value=cache.misses)
        lookups = cache.hits + cache.misses
        yield GaugeMetricFamily(
            "autocert_context_cache_hit_ratio", "Hits over lookups since start (NaN before the first lookup).",
            value=cache.hits / lookups if lookups else math.nan,
        )

        try:
            in_flight = len(manager.worker.in_flight)
        except AutocertError:  # not started: nothing is in flight
            in_flight = 0
        yield GaugeMetricFamily("autocert_issuance_in_flight", "Orders running or queued in this process.", value=in_flight)

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

