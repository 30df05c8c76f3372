"""Honest latency: finer Locust buckets, and an HDR histogram per process merged on the master.

Locust keeps response times in a dict of rounded values (``locust.stats.
bucket_response_time``: whole milliseconds below 100 ms), so decisions that take
0.3 ms and 1.4 ms land in buckets 0 and 1 and every percentile of a fast governor reads
0 or 1. Locust documents that module-level function as the hook for custom bucketing
("customizing response time bucketing"): :func:`install_fine_buckets` replaces it with
one that keeps two significant digits from 0.01 ms up (0.01 ms below 1 ms, 0.1 ms below
10 ms; from 10 ms on Locust's own whole milliseconds suffice). Every bucket is a key that
Locust's CSV writer sorts for each percentile of each row every second, so the buckets
are no finer than that (three digits cost about 5% of a sender's CPU at 2,000 plans/s in a
py-spy profile). Locust's CSV still prints
percentiles as whole ms (``int()`` in its writer); its averages, minima and maxima keep
the fractions.

The figures to trust are the HDR histogram's: every latency recorded in microseconds
(1 us to 60 s, 3 significant digits) per process; workers send what they recorded
since their last report with ``report_to_master`` and the master adds it up in
``worker_report`` (:class:`LatencyRecorder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import locust.stats
from hdrh.histogram import HdrHistogram

LOWEST_US, HIGHEST_US, DIGITS = 1, 60_000_000, 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
REPORT_KEY = "governor_hdr"


def fine_bucket(response_time: int | float) -> float:
    """0.01 ms below 1 ms, 0.1 ms below 10 ms, Locust's own rounding above."""
    if response_time < 1:
        return round(response_time, 2)
    if response_time < 10:
        return round(response_time, 1)
    return _locust_bucket(response_time)


_locust_bucket = locust.stats.bucket_response_time


def install_fine_buckets() -> None:
    """Replace Locust's bucketing in this process (every process: workers log requests)."""
    locust.stats.bucket_response_time = fine_bucket  # type: ignore[assignment]


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


class LatencyRecorder:
    """This process's histogram (``total``) and what it recorded since the last report
    (``delta``, sent to the master and reset)."""

    def __init__(self) -> None:
        self.total = new_histogram()
        self.delta = new_histogram()

    def record_ms(self, ms: float) -> None:
        us = min(HIGHEST_US, max(LOWEST_US, round(ms * 1000)))
        self.total.record_value(us)
        self.delta.record_value(us)

    def report(self, data: dict[str, Any]) -> None:
        """``report_to_master``: add the delta (encoded) to the worker's report."""
        if self.delta.get_total_count():
            data[REPORT_KEY] = self.delta.encode().decode("ascii")
            self.delta.reset()

    def merge(self, data: dict[str, Any]) -> None:
        """``worker_report`` on the master: add a worker's delta."""
        encoded = data.get(REPORT_KEY)
        if encoded:
            self.total.decode_and_add(encoded.encode("ascii")
                                      if isinstance(encoded, str) else encoded)


def summary(h: HdrHistogram) -> dict[str, Any]:
    """p50/p90/p99/p99.9/max (ms, to the microsecond) and the count."""
    n = h.get_total_count()
    out: dict[str, Any] = {"count": n, "unit": "ms"}
    for p in PERCENTILES:
        out[f"p{p:g}"] = h.get_value_at_percentile(p) / 1000 if n else None
    out["max"] = h.get_max_value() / 1000 if n else None
    out["mean"] = round(h.get_mean_value() / 1000, 3) if n else None
    return out


def write(path: Path, figures: dict[str, Any]) -> None:
    path.write_text(json.dumps(figures, indent=2) + "\n")


def format_line(s: dict[str, Any]) -> str:
    if not s.get("count"):
        return "decision latency: no decision recorded"
    parts = [f"{k} {s[k]:.3f}" for k in ("p50", "p90", "p99", "p99.9", "max")]
    return f"decision latency (ms, HDR, from the scheduled send, {s['count']} plans): " + \
        ", ".join(parts)
