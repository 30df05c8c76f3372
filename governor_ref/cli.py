"""``governor-ref run``: start one governor instance.

With no options, everything comes from the protocol's environment
(``REDIS_URL``, ``GOVERNOR_PREFIX``, ``GOVERNOR_CONSUMER``), which is how the
chaos harness starts any governor under test; the limits come from
``P:governor:config`` in Redis.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from .governor import Governor, Settings
from .variants import VARIANTS, factory


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="governor-ref", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one governor instance until SIGTERM/SIGINT")
    run.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                     help="redis://, rediss:// or redis-sentinel://h:p,h:p/master (env REDIS_URL)")
    run.add_argument("--prefix", default=os.environ.get("GOVERNOR_PREFIX", "quantum"),
                     help="key prefix P (env GOVERNOR_PREFIX, default quantum)")
    run.add_argument("--consumer", default=os.environ.get("GOVERNOR_CONSUMER"),
                     help="consumer name, unique per instance (env GOVERNOR_CONSUMER)")
    run.add_argument("--variant", default=os.environ.get("GOVERNOR_VARIANT", "reference"),
                     choices=sorted(VARIANTS), help="decision logic (env GOVERNOR_VARIANT)")
    run.add_argument("--batch", type=int, default=128, help="plans read per round trip")
    run.add_argument("--claim-idle-ms", type=int, default=3000,
                     help="reclaim entries another consumer left idle this long")
    run.add_argument("--reconcile-scan-keys", type=int, default=10_000,
                     help="keys the reference's periodic reconcile walks at most per second "
                          "(its SCAN of P:position:* goes on from where the last stopped)")
    run.add_argument("--metrics-port", type=int,
                     default=int(os.environ["GOVERNOR_METRICS_PORT"])
                     if os.environ.get("GOVERNOR_METRICS_PORT") else None,
                     help="serve Prometheus metrics on 127.0.0.1:PORT")
    run.add_argument("--log-level", default=os.environ.get("GOVERNOR_LOG_LEVEL", "INFO"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
    )
    if args.batch < 1:
        print("governor-ref: --batch must be >= 1", file=sys.stderr)
        return 2
    if args.reconcile_scan_keys < 1:
        print("governor-ref: --reconcile-scan-keys must be >= 1", file=sys.stderr)
        return 2
    consumer = args.consumer or f"{socket.gethostname()}-{os.getpid()}"
    settings = Settings(redis_url=args.redis_url, prefix=args.prefix, consumer=consumer,
                        variant=args.variant, batch=args.batch, claim_idle_ms=args.claim_idle_ms,
                        reconcile_scan_keys=args.reconcile_scan_keys,
                        metrics_port=args.metrics_port)
    try:
        gov = Governor(settings, factory(args.variant))
    except ValueError as exc:
        print(f"governor-ref: {exc}", file=sys.stderr)
        return 2

    def _stop(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        gov.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    gov.run()
    return 0
