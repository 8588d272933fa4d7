"""Prometheus metrics of a node, read from the plain counters at scrape time.

How this works: the write path only bumps integers in ``VolumeStats`` (core/stats.py); this
collector turns them into Prometheus families when ``/metrics`` is scraped, so no
prometheus-client object sits on the hot path.  Names follow
``volkeeper_<object>_<quantity>_<unit>`` (DESIGN.md), labelled by ``volume`` and ``op``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from volkeeper.io.volume_service import VolumeService


class NodeCollector(Collector):
    def __init__(
        self, services: Callable[[], Sequence[VolumeService]], connections: Callable[[], int]
    ) -> None:
        self._services = services
        self._connections = connections

    def collect(self) -> Iterator[Metric]:
        services = self._services()
        size = GaugeMetricFamily(
            "volkeeper_volume_size_bytes", "Size of the volume", labels=["volume"]
        )
        read = CounterMetricFamily(
            "volkeeper_volume_read_bytes", "Bytes read through NBD", labels=["volume"]
        )
        written = CounterMetricFamily(
            "volkeeper_volume_written_bytes", "Bytes written through NBD", labels=["volume"]
        )
        flushes = CounterMetricFamily(
            "volkeeper_volume_flushes", "NBD flush requests completed", labels=["volume"]
        )
        requests = CounterMetricFamily(
            "volkeeper_volume_requests", "NBD requests completed", labels=["volume", "op"]
        )
        errors = CounterMetricFamily(
            "volkeeper_volume_request_errors", "NBD requests failed", labels=["volume", "op"]
        )
        latency = HistogramMetricFamily(
            "volkeeper_volume_request_duration_seconds",
            "Time from receiving an NBD request to sending its reply",
            labels=["volume", "op"],
        )
        for service in services:
            name = service.name
            ops = service.stats.ops
            size.add_metric([name], service.volume.size)
            read.add_metric([name], ops["read"].bytes)
            written.add_metric([name], ops["write"].bytes)
            flushes.add_metric([name], ops["flush"].requests)
            for op, stats in ops.items():
                requests.add_metric([name, op], stats.requests)
                errors.add_metric([name, op], stats.errors)
                buckets = [(_bound(b), count) for b, count in stats.cumulative_buckets()]
                latency.add_metric([name, op], buckets, stats.seconds)
        connections = GaugeMetricFamily("volkeeper_nbd_connections", "NBD clients connected now")
        connections.add_metric([], self._connections())
        yield from (size, read, written, flushes, requests, errors, latency, connections)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
