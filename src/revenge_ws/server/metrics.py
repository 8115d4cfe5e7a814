"""Prometheus metrics (prometheus-client), one registry per application."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["PrometheusObserver"]


class PrometheusObserver:
    """The core's :class:`~revenge_ws.core.observer.Observer`, exported at ``/metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.connections = Gauge("revenge_connections", "Open WebSocket connections", registry=r)
        self.opened = Counter(
            "revenge_connections_opened", "WebSocket connections opened", registry=r
        )
        self.disconnects = Counter(
            "revenge_disconnects", "Connections closed, by close code", ["code"], registry=r
        )
        self.duration = Histogram(
            "revenge_connection_duration_seconds",
            "How long connections lasted",
            buckets=(1, 10, 60, 300, 1800, 3600, 4 * 3600, 24 * 3600),
            registry=r,
        )
        self.msg_in = Counter(
            "revenge_messages_in", "Client messages received, by type", ["type"], registry=r
        )
        self.msg_out = Counter(
            "revenge_messages_out", "Publications delivered, by type", ["type"], registry=r
        )
        self.latency = Histogram(
            "revenge_publish_to_send_seconds",
            "From the broker accepting a publication to its fan-out on this node",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.slow = Counter(
            "revenge_slow_connections", "Connections closed as slow consumers (4002)", registry=r
        )
        self.refused = Counter(
            "revenge_handshakes_refused", "Refused handshakes, by error code", ["code"], registry=r
        )

    def connection_opened(self) -> None:
        self.connections.inc()
        self.opened.inc()

    def connection_closed(self, code: int | None, duration: float) -> None:
        self.connections.dec()
        self.disconnects.labels(str(code if code is not None else 1006)).inc()
        self.duration.observe(duration)

    def message_in(self, mtype: str) -> None:
        self.msg_in.labels(mtype).inc()

    def messages_out(self, mtype: str, count: int) -> None:
        # Publication types come from the backend, a trusted and bounded vocabulary.
        self.msg_out.labels(mtype[:64]).inc(count)

    def publish_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def slow_connection(self) -> None:
        self.slow.inc()

    def handshake_refused(self, code: str) -> None:
        self.refused.labels(code).inc()
