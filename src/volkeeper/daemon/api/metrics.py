"""Prometheus metrics of a node, read from the plain counters at scrape time.

How this works: the write path only bumps integers in ``VolumeStats`` (core/stats.py); this
collector turns them into Prometheus families when ``/metrics`` is scraped, so no
prometheus-client object sits on the hot path.  Names follow
``volkeeper_<object>_<quantity>_<unit>`` (DESIGN.md), labelled by ``volume`` and ``op``; mirror
families (``MirrorCollector``) by ``job``, ``target`` (``NODE:VOLUME``) and, on a target node,
``volume`` and ``source``.  ``volkeeper_mirror_state`` is an enum family: one series per state,
1 for the mirror's current one; ``volkeeper_volume_role_info`` (``RoleCollector``) is 1 for a
volume's role, data state and generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from volkeeper.core.mirror_state import MirrorState
from volkeeper.core.stats import OpStats
from volkeeper.daemon.source.mirror import Mirror
from volkeeper.daemon.source.mirror_view import mirror_view
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
                latency.add_metric([name, op], _histogram(stats), stats.seconds)
        connections = GaugeMetricFamily("volkeeper_nbd_connections", "NBD clients connected now")
        connections.add_metric([], self._connections())
        yield from (size, read, written, flushes, requests, errors, latency, connections)


class RoleCollector(Collector):
    """Each volume's role, data state and generation (daemon/node.py's volume views)."""

    def __init__(self, volumes: Callable[[], list[dict[str, Any]]]) -> None:
        self._volumes = volumes

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "volkeeper_volume_role_info",
            "1 for the volume's role, data state and generation (hex; empty: standalone)",
            labels=["volume", "role", "data_state", "generation"],
        )
        locked = GaugeMetricFamily(
            "volkeeper_volume_locked", "1 while the volume takes no writes", labels=["volume"]
        )
        for view in self._volumes():
            labels = [view["role"], view.get("data_state") or "", view.get("generation") or ""]
            info.add_metric([view["name"], *labels], 1)
            locked.add_metric([view["name"]], 1 if view["locked"] else 0)
        yield from (info, locked)


class LimitCollector(Collector):
    """How many times each limit against abuse held (io/limits.py)."""

    def __init__(self, hits: Callable[[], dict[str, int]]) -> None:
        self._hits = hits

    def collect(self) -> Iterator[Metric]:
        hits = CounterMetricFamily(
            "volkeeper_limit_hits",
            "Connections or reads refused, closed or paused by a limit against abuse",
            labels=["limit"],
        )
        for limit, count in sorted(self._hits().items()):
            hits.add_metric([limit], count)
        yield hits


class PeerCollector(Collector):
    """How each peer's replication link is protected (daemon/node.py's peer views)."""

    def __init__(self, peers: Callable[[], list[dict[str, Any]]]) -> None:
        self._peers = peers

    def collect(self) -> Iterator[Metric]:
        link = GaugeMetricFamily(
            "volkeeper_peer_link_info",
            "1 for the peer's link protection: pinned, ca, insecure (plain TCP) or unpinned",
            labels=["peer", "link"],
        )
        insecure = GaugeMetricFamily(
            "volkeeper_peer_link_insecure",
            "1 while the link to the peer is plain TCP, neither authenticated nor encrypted",
            labels=["peer"],
        )
        for view in self._peers():
            link.add_metric([view["name"], view["link"]], 1)
            insecure.add_metric([view["name"]], 1 if view["link"] == "insecure" else 0)
        yield from (link, insecure)


class MirrorCollector(Collector):
    """Mirrors this node is the source of, and target volumes it receives for."""

    def __init__(
        self,
        mirrors: Callable[[], Sequence[Mirror]],
        received: Callable[[], Sequence[tuple[str, str, int]]],
    ) -> None:
        self._mirrors = mirrors
        self._received = received  # (target volume, source NODE:VOLUME, bytes received)

    def collect(self) -> Iterator[Metric]:
        labels = ["job", "target"]
        state = GaugeMetricFamily(
            "volkeeper_mirror_state", "1 for the mirror's current state", labels=[*labels, "state"]
        )
        out_of_sync = GaugeMetricFamily(
            "volkeeper_mirror_outofsync_bytes", "Bytes the intent log marks", labels=labels
        )
        sent = CounterMetricFamily(
            "volkeeper_mirror_sent_bytes", "Write and resync payload bytes sent", labels=labels
        )
        resent = CounterMetricFamily(
            "volkeeper_mirror_resync_sent_bytes", "Payload bytes sent by resyncs", labels=labels
        )
        wire = CounterMetricFamily(
            "volkeeper_mirror_wire_bytes",
            "Write and resync payload bytes put on the wire (after compression)",
            labels=labels,
        )
        queue = GaugeMetricFamily(
            "volkeeper_mirror_queue_bytes", "Write bytes sent, not yet acknowledged", labels=labels
        )
        lag = GaugeMetricFamily(
            "volkeeper_mirror_lag_seconds", "Age of the oldest unacknowledged write", labels=labels
        )
        overflows = CounterMetricFamily(
            "volkeeper_mirror_queue_overflows", "Async writes tracked: queue full", labels=labels
        )
        target_errors = CounterMetricFamily(
            "volkeeper_mirror_target_errors",
            "Frames the target answered with an error (its disk failed them)",
            labels=labels,
        )
        resync_done = GaugeMetricFamily(
            "volkeeper_mirror_resync_done_bytes", "Bytes sent by the running resync", labels=labels
        )
        resync_rate = GaugeMetricFamily(
            "volkeeper_mirror_resync_rate_bytes_per_second", "Resync rate", labels=labels
        )
        ack = HistogramMetricFamily(
            "volkeeper_mirror_ack_duration_seconds",
            "Time from sending a write or flush to the target's acknowledgement",
            labels=labels,
        )
        for mirror in self._mirrors():
            view = mirror_view(mirror)
            key = [mirror.spec.job, mirror.spec.target]
            for each in MirrorState:
                state.add_metric([*key, each.value], 1 if mirror.state is each else 0)
            out_of_sync.add_metric(key, view["out_of_sync_bytes"])
            sent.add_metric(key, view["sent_bytes"])
            resent.add_metric(key, view["resync_sent_bytes"])
            wire.add_metric(key, view["wire_bytes"])
            queue.add_metric(key, view["queue_bytes"])
            lag.add_metric(key, view["lag_s"])
            overflows.add_metric(key, mirror.engine.overflows)
            target_errors.add_metric(key, mirror.engine.target_errors)
            resync_done.add_metric(key, view["resync"]["done_bytes"])
            resync_rate.add_metric(key, view["resync"]["rate_bytes_per_s"])
            latency = mirror.ledger.ack_latency
            ack.add_metric(key, _histogram(latency), latency.seconds)
        received = CounterMetricFamily(
            "volkeeper_mirror_received_bytes",
            "Write and resync payload bytes received for a target volume",
            labels=["volume", "source"],
        )
        for volume, source, count in self._received():
            received.add_metric([volume, source], count)
        yield from (state, out_of_sync, sent, resent, wire, queue, lag, overflows, target_errors)
        yield from (resync_done, resync_rate, ack, received)


def _histogram(stats: OpStats) -> list[tuple[str, int]]:
    return [(_bound(bound), count) for bound, count in stats.cumulative_buckets()]


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
