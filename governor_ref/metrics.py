"""Prometheus metrics of a governor process (served only when a port is given)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)


class Metrics:
    """Decisions by decision and reason, decision latency, results and retries."""

    def __init__(self, variant: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.variant = variant
        self.decisions = Counter(
            "governor_decisions", "Decisions made", ["variant", "decision", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "governor_decision_latency_seconds",
            "From reading a plan to its decision being written",
            ["variant"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.results = Counter(
            "governor_results", "Apply results settled", ["variant", "status"],
            registry=self.registry,
        )
        self.retries = Counter(
            "governor_redis_retries", "Redis errors that caused a backoff and retry",
            ["variant", "kind"], registry=self.registry,
        )

        self._children: dict[tuple[str, str], Counter] = {}
        self._latency = self.latency.labels(variant)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)

    def decided(self, decision: str, reason: str, seconds: float) -> None:
        key = (decision, reason)
        child = self._children.get(key)
        if child is None:  # labels() costs a lock and a dict build; cache the child
            child = self._children[key] = self.decisions.labels(self.variant, decision, reason)
        child.inc()
        self._latency.observe(seconds)
