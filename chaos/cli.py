"""``chaos``: the harness's command line. Thin: the library does the work.

Exit codes: 0 valid, 1 invalid (an invariant was violated), 2 unknown,
254 bad arguments, 255 the harness itself failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_VALID, EXIT_INVALID, EXIT_UNKNOWN, EXIT_BAD_ARGS, EXIT_HARNESS = 0, 1, 2, 254, 255


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2; 2 means "unknown" here
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_ARGS, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="chaos", description="Chaos-testing harness for Redis-backed governors.")
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="a short demo load on an embedded Redis")
    demo.add_argument("--seconds", type=float, default=10.0)
    demo.add_argument("--governors", type=int, default=3)
    demo.add_argument("--variant", default="reference", choices=["reference", "seed", "legacy"])
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--out", type=Path, default=None, help="run directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        if args.command == "demo":
            if args.seconds <= 0 or args.governors < 1:
                print("chaos demo: --seconds must be > 0 and --governors >= 1", file=sys.stderr)
                return EXIT_BAD_ARGS
            from chaos.demo import format_result, run_demo

            res = run_demo(args.seconds, args.governors, args.variant, args.seed, args.out)
            print(format_result(res))
            return EXIT_VALID if res.ok else EXIT_INVALID
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_HARNESS
    except Exception as exc:  # noqa: BLE001 - the harness failing is its own exit code
        logging.getLogger("chaos").exception("harness failure")
        print(f"chaos: harness failure: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    return EXIT_BAD_ARGS
