"""``chaos``: the harness's command line. Thin: the library does the work.

Exit codes: 0 valid, 1 invalid (an invariant was violated), 2 unknown,
254 bad arguments, 255 the harness itself failed.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any

EXIT_VALID, EXIT_INVALID, EXIT_UNKNOWN, EXIT_BAD_ARGS, EXIT_HARNESS = 0, 1, 2, 254, 255


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """Exit 254 (argparse's 2 means "unknown" here) with one line naming the option:
        a usage block before it buried the one line that says what is wrong."""
        self.exit(EXIT_BAD_ARGS, f"{self.prog}: error: {' '.join(message.split())} "
                                 f"(see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="chaos", description="Chaos-testing harness for Redis-backed governors.")
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run one scenario against a governor; writes a run directory")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--scenario",
                      help="built-in scenario name (see `chaos scenarios`) or a .toml file")
    what.add_argument("--replay", type=Path, metavar="RUN_DIR",
                      help="run a recorded run again: its plans, in order per producer, at "
                           "their offsets, with its faults (docs/reproducers.md)")
    g = run.add_mutually_exclusive_group()
    g.add_argument("--governor", default="reference", choices=["reference", "seed", "legacy"],
                   help="a governor shipped with the project")
    g.add_argument("--governor-cmd", metavar="CMD",
                   help="any governor speaking the protocol, started as CMD with REDIS_URL, "
                        "GOVERNOR_PREFIX and GOVERNOR_CONSUMER in its environment")
    run.add_argument("--governors", type=int, help="instances (default: the scenario's)")
    run.add_argument("--redis", choices=["embedded", "docker", "url"], default=None)
    run.add_argument("--redis-url", help="with --redis url: an existing Redis (keys under a "
                     "run-specific prefix; never flushed or reconfigured)")
    run.add_argument("--seed", type=int)
    run.add_argument("--duration", type=float, help="seconds of workload")
    run.add_argument("--out", type=Path, help="the run directory itself")
    run.add_argument("--no-probe", action="store_true", help="skip the liveness probe")
    run.add_argument("--probe-max-wait", type=float, default=120.0,
                     help="cap on the wait for TTLs to lapse before the probe (s)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--no-report", action="store_true",
                     help="skip report.md / report.html / plots (results.json is always written)")
    sub.add_parser("scenarios", help="list the built-in scenarios")
    chk = sub.add_parser("check", help="re-check a stored run directory")
    chk.add_argument("run_dir", type=Path)
    rep = sub.add_parser("report", help="write report.md, report.html and plots for a run")
    rep.add_argument("run_dir", type=Path)
    for sp in (chk, rep):
        sp.add_argument("--no-minimize", action="store_true",
                       help="do not search each violation's minimal witness")
        sp.add_argument("--witness-budget-s", type=float, default=2.0, metavar="S",
                       help="time for each violation's minimal witness (default 2)")
        sp.add_argument("--witness-run-budget-s", type=float, default=20.0, metavar="S",
                       help="time for every minimal witness of the run (default 20)")
        sp.add_argument("--witness-cap", type=int, default=5, metavar="N",
                       help="violations minimised per invariant, the first in time "
                            "(default 5)")
    suite = sub.add_parser("suite", help="every pass/fail scenario; exit 0 only if all valid")
    gs = suite.add_mutually_exclusive_group()
    gs.add_argument("--governor", default="reference", choices=["reference", "seed", "legacy"])
    gs.add_argument("--governor-cmd", metavar="CMD")
    suite.add_argument("--quick", action="store_true", help="short scenarios (a few minutes)")
    suite.add_argument("--seeds", type=int, default=1, help="seeds per scenario")
    suite.add_argument("--first-seed", type=int,
                       help="seeds run from here (default: each scenario's own seed)")
    suite.add_argument("--scenario", action="append", dest="scenarios",
                       help="only these scenarios (repeatable)")
    suite.add_argument("--redis", choices=["embedded", "docker", "url"], default=None)
    suite.add_argument("--redis-url")
    suite.add_argument("--out", type=Path, help="suite directory")
    suite.add_argument("--conformance", action="store_true",
                       help="run `chaos conformance` first; stop (exit 1) if a case fails")
    conf = sub.add_parser("conformance", help="protocol cases against one governor (seconds): "
                          "PASS / FAIL / NOT PRESENT per case; exit 0 only if none fails")
    gcf = conf.add_mutually_exclusive_group()
    gcf.add_argument("--governor", default="reference", choices=["reference", "seed", "legacy"])
    gcf.add_argument("--governor-cmd", metavar="CMD", help="any governor speaking the protocol")
    conf.add_argument("--case", action="append", dest="cases", metavar="NAME",
                      help="only these cases (repeatable; see --list)")
    conf.add_argument("--list", action="store_true", help="list the cases and exit")
    conf.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    conf.add_argument("--junit", type=Path, metavar="PATH", help="write JUnit XML")
    conf.add_argument("--logs", type=Path, metavar="DIR", help="keep each case's governor log "
                      "here (default: a temp dir, kept only when a case fails)")
    imp = sub.add_parser("import", help="import what a production Redis recorded (streams, "
                         "position mirror, inputs) as a run directory, and check it")
    src = imp.add_mutually_exclusive_group(required=True)
    src.add_argument("--redis-url", metavar="URL", help="the Redis to read (read-only: XRANGE, "
                     "SCAN, HGETALL, GET); redis://, rediss://, unix:// or "
                     "redis-sentinel://h:p,h:p/master")
    src.add_argument("--rdb", type=Path, metavar="FILE", help="a saved dump (BGSAVE), read "
                     "through a private redis-server started on a copy of it")
    imp.add_argument("--prefix", required=True, help="the governors' key prefix (P)")
    imp.add_argument("--since", type=_bound, metavar="T", help="window start: a stream id "
                     "(1795514182279-0), epoch ms or ISO-8601 time (UTC unless it says)")
    imp.add_argument("--until", type=_bound, metavar="T", help="window end (inclusive), same "
                     "forms")
    imp.add_argument("--out", type=Path, help="the run directory itself (default "
                     "reports/imports/<prefix>/<timestamp>/)")
    imp.add_argument("--quiet", action="store_true", help="no progress")
    imp.add_argument("--no-report", action="store_true",
                     help="skip report.md / report.html / plots (results.json is always written)")
    nb = sub.add_parser("notebook", help="execute a shipped notebook on a run directory "
                        "(papermill) into RUN_DIR/notebooks/, optionally as HTML")
    nb.add_argument("name", help="01_chaos_run_overview ... 06_post_incident, or its number")
    nb.add_argument("run_dir", type=Path)
    nb.add_argument("--html", action="store_true",
                    help="also a self-contained HTML export without the code cells")
    nb.add_argument("-p", "--param", nargs=2, action="append", default=[],
                    metavar=("KEY", "VALUE"), help="a notebook parameter (VALUE as JSON if it "
                    "parses, e.g. '[\"a\", \"b\"]', else a string); repeatable")
    nb.add_argument("--quiet", action="store_true", help="no progress bar")
    shr = sub.add_parser("shrink", help="from an invalid run, a smaller scenario that still "
                         "violates the same invariant in k of N runs (repro.toml)")
    shr.add_argument("run_dir", type=Path)
    shr.add_argument("--tries", type=int, default=10, help="runs of the final verification (N)")
    shr.add_argument("--k", type=int, default=8, help="failures of N that count as reproduced")
    shr.add_argument("--search-tries", type=int, default=4,
                     help="runs per candidate during the search (at most N; early-stopped)")
    shr.add_argument("--budget-s", type=float, default=600.0, help="time budget (s)")
    shr.add_argument("--invariant", help="the invariant to keep violated (default: the one "
                     "violated most often; ties: the one violated first)")
    shr.add_argument("--out", type=Path, help="output directory (default RUN_DIR/shrink)")
    gsh = shr.add_mutually_exclusive_group()
    gsh.add_argument("--governor", default=None, choices=["reference", "seed", "legacy"],
                     help="default: the run's own governor")
    gsh.add_argument("--governor-cmd", metavar="CMD")
    shr.add_argument("--quiet", action="store_true", help="no progress lines")
    demo = sub.add_parser("demo", help="a short demo load on an embedded Redis")
    demo.add_argument("--seconds", type=float, default=10.0)
    demo.add_argument("--governors", type=int, default=3)
    demo.add_argument("--variant", default="reference", choices=["reference", "seed", "legacy"])
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--out", type=Path, default=None, help="run directory")
    return p


def _bound(text: str) -> object:
    """``--since`` / ``--until``: argparse names the option in the error (exit 254)."""
    from chaos.importer import parse_bound

    try:
        return parse_bound(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM: stops a run or a suite exactly as Ctrl-C does (teardown in order, run.json
    ``interrupted``, exit 2). Without it SIGTERM would end the harness at once and leave
    its Redis, governors and temp dir behind (the reaper would still kill them, but the run
    directory would say ``running`` and lose its end)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signum}")


def _install_stop_signals() -> dict[int, object]:
    """SIGINT and SIGTERM raise in the main thread; returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {signal.SIGINT: signal.getsignal(signal.SIGINT),
           signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    # A process started with SIGINT ignored (a background job of a script, some test
    # runners' workers) keeps it ignored; Python would then never raise
    # KeyboardInterrupt, and Ctrl-C / kill -INT could not stop a run cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return old


def _restore_signals(old: dict[int, object]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    old = _install_stop_signals()
    try:
        return _main(args)
    except KeyboardInterrupt:  # before or after a run's own handling: still unknown
        print("interrupted", file=sys.stderr)
        return EXIT_UNKNOWN
    finally:
        _restore_signals(old)


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "scenarios":
            return _scenarios()
        if args.command == "run":
            return _run(args)
        if args.command in ("check", "report"):
            bounds = _minimize(args)
            if bounds is None:
                return EXIT_BAD_ARGS
            return (_check if args.command == "check" else _report)(args.run_dir, bounds)
        if args.command == "suite":
            return _suite(args)
        if args.command == "conformance":
            return _conformance(args)
        if args.command == "import":
            return _import(args)
        if args.command == "notebook":
            return _notebook(args)
        if args.command == "shrink":
            return _shrink(args)
        if args.command == "demo":
            if not (math.isfinite(args.seconds) and 0 < args.seconds <= 86400) or \
                    not 1 <= args.governors <= 64:
                print("chaos demo: --seconds must be within 0..86400 (exclusive of 0) and "
                      "--governors within 1..64", file=sys.stderr)
                return EXIT_BAD_ARGS
            from chaos.demo import format_result, run_demo

            res = run_demo(args.seconds, args.governors, args.variant, args.seed, args.out)
            print(format_result(res))
            return EXIT_VALID if res.ok else EXIT_INVALID
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_UNKNOWN
    except Exception as exc:  # noqa: BLE001 - the harness failing is its own exit code
        logging.getLogger("chaos").exception("harness failure")
        print(f"chaos: harness failure: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    return EXIT_BAD_ARGS


def _shrink(args: argparse.Namespace) -> int:
    from chaos import shrink as shr
    from chaos.rundir import NotARun, RunDirError
    from chaos.runner import HarnessError

    opts = shr.ShrinkOptions(run_dir=args.run_dir, out=args.out, tries=args.tries, k=args.k,
                             budget_s=args.budget_s, invariant=args.invariant,
                             governor=args.governor, governor_cmd=args.governor_cmd,
                             search_tries=args.search_tries,
                             progress=None if args.quiet else shr.progress_line)
    try:
        res = shr.shrink(opts)
    except (shr.ShrinkError, NotARun) as exc:
        print(f"chaos shrink: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except (RunDirError, HarnessError) as exc:
        print(f"chaos shrink: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    print(f"chaos shrink: {res.message}")
    return res.exit_code


def _scenarios() -> int:
    from chaos import scenario as scn

    for name in scn.builtin_names():
        s = scn.load(name)
        tag = "exposure" if s.exposure else "pass/fail"
        print(f"{name:<20} {tag:<9} {s.description}")
    return EXIT_VALID


def _redis_args(args: argparse.Namespace) -> str | None:
    """``--redis`` as given, or ``url`` when only ``--redis-url`` is (a URL given and then
    ignored for an embedded Redis would test another server than the one asked for);
    the URL's form is checked here, before anything starts. Raises ScenarioError."""
    from chaos import scenario as scn
    from chaos.redis_servers import check_url

    if args.redis_url is None:
        if args.redis == "url":
            raise scn.ScenarioError("--redis url needs --redis-url URL")
        return args.redis
    if args.redis not in (None, "url"):
        raise scn.ScenarioError(f"--redis-url goes with --redis url, not --redis {args.redis}")
    try:
        check_url(args.redis_url)
    except ValueError as exc:
        raise scn.ScenarioError(f"--redis-url: {exc}") from None
    return "url"


def _reach(url: str) -> str | None:
    """Why the Redis at ``url`` cannot be used (one line, password masked), or None.

    Asked before a run directory exists, so that a wrong host or password is one line and
    exit 255, not a traceback from the middle of a run that leaves a directory behind.
    """
    import redis

    from chaos.redis_servers import redact_url

    try:
        c = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    except ValueError as exc:
        return f"{redact_url(url)}: {exc}"
    try:
        c.ping()
    except (redis.RedisError, OSError) as exc:
        return f"cannot reach Redis at {redact_url(url)}: {' '.join(str(exc).split())}"
    finally:
        c.close()
    return None


def _run(args: argparse.Namespace) -> int:

    from chaos import scenario as scn
    from chaos.redis_servers import RedisProviderError
    from chaos.runner import HarnessError, RunOptions, check_out, run

    try:
        if args.replay is not None:
            from chaos.replay import scenario_from_run, truncate

            sc = scenario_from_run(args.replay)
            if args.duration is not None:  # the recording's first seconds
                sc = truncate(sc, args.duration)
        else:
            sc = scn.load(args.scenario)
        sc = sc.with_overrides(seed=args.seed, duration_s=args.duration,
                               governors=args.governors)
        redis_kind = _redis_args(args)
        kind = redis_kind or sc.redis.kind
        if kind == "url" and not (args.redis_url or sc.redis.url):
            raise scn.ScenarioError("redis.kind = 'url' needs --redis-url URL (or redis.url)")
        if sc.redis.topology == "sentinel" and kind != "embedded":
            raise scn.ScenarioError(f"redis.topology: sentinel is only available embedded, "
                                    f"not --redis {kind}")
        if not (math.isfinite(args.probe_max_wait) and 0 <= args.probe_max_wait <= 3600):
            raise scn.ScenarioError("--probe-max-wait: must be within 0..3600 seconds")
        if args.governor_cmd is not None and not args.governor_cmd.strip():
            raise scn.ScenarioError("--governor-cmd: must not be empty")
        check_out(args.out)
        opts = RunOptions(scenario=sc, governor=args.governor, governor_cmd=args.governor_cmd,
                          redis_kind=redis_kind, redis_url=args.redis_url, out=args.out,
                          progress=not args.quiet and sys.stderr.isatty(),
                          probe=not args.no_probe,
                          probe_max_wait_s=args.probe_max_wait)
        opts.governor_spec()
    except scn.ScenarioError as exc:
        print(f"chaos run: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    url = args.redis_url or sc.redis.url
    if (redis_kind or sc.redis.kind) == "url" and url and (why := _reach(url)):
        print(f"chaos run: {why}", file=sys.stderr)
        return EXIT_HARNESS
    try:
        res = run(opts)
    except HarnessError as exc:
        print(f"chaos run: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    except RedisProviderError as exc:
        print(f"chaos run: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_HARNESS
    except scn.ScenarioError as exc:
        print(f"chaos run: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    print(f"run directory: {res.run_dir}")
    print(f"status: {res.status}")
    for k, v in res.stats.items():
        if k in ("peak_open_positions", "double_opens", "double_closes", "orders",
                 "decisions_recorded"):
            print(f"  {k:<22} {v}")
    if res.probe is not None:
        p = res.probe
        ok_c = sum(v == "PERMIT" for v in p.closes.values())
        ok_o = sum(v == "PERMIT" for v in p.opens.values())
        print(f"  liveness probe         {'ok' if p.ok else 'FAILED'}: {ok_c}/{len(p.closes)} "
              f"closes and {ok_o}/{len(p.opens)} opens permitted")
    from chaos.checkers import check_run

    verdict = check_run(res.run_dir)
    print(verdict.summary())
    if not args.no_report:
        from chaos.report import write_report

        paths = write_report(res.run_dir, verdict)
        print(f"report: {paths.html}")
    if res.status == "interrupted":
        return EXIT_UNKNOWN
    return verdict.exit_code


def _minimize(args: argparse.Namespace) -> Any:
    """The minimal-witness search's bounds from ``--witness-*`` (False: ``--no-minimize``;
    None, after one line naming the option, when one is not a positive number)."""
    if args.no_minimize:
        return False
    from chaos.checkers.minimize import MinimizeOptions

    for name in ("witness_budget_s", "witness_run_budget_s", "witness_cap"):
        if not getattr(args, name) > 0:
            print(f"chaos {args.command}: --{name.replace('_', '-')} must be positive, got "
                  f"{getattr(args, name)}", file=sys.stderr)
            return None
    return MinimizeOptions(violation_budget_s=args.witness_budget_s,
                           budget_s=args.witness_run_budget_s, per_invariant=args.witness_cap)


def _judge(run_dir: Path, command: str, minimize: Any = True) -> Any:
    """The verdict on a stored run directory, or the exit code after one line saying why
    it cannot be judged (a damaged or incomplete run is named, never given a verdict)."""
    from chaos.checkers import check_run

    if (code := _preflight(run_dir, command)) is not None:
        return code
    try:
        return check_run(run_dir, minimize=minimize)
    except _history_error() as exc:
        print(f"chaos {command}: {exc}", file=sys.stderr)
        return EXIT_HARNESS


def _check(run_dir: Path, minimize: Any = True) -> int:
    verdict = _judge(run_dir, "check", minimize)
    if isinstance(verdict, int):
        return verdict
    print(verdict.summary())
    print(f"written {run_dir / 'results.json'}")
    return int(verdict.exit_code)


def _suite(args: argparse.Namespace) -> int:
    import time

    from chaos import scenario as scn
    from chaos.runner import HarnessError
    from chaos.suite import HEADER, SuiteInterrupted, run_suite

    if not 1 <= args.seeds <= 1000:
        print("chaos suite: --seeds must be within 1..1000", file=sys.stderr)
        return EXIT_BAD_ARGS
    out = args.out or Path("reports") / "suites" / time.strftime("%Y%m%dT%H%M%S")
    try:
        for name in args.scenarios or []:
            scn.load(name)
        if args.first_seed is not None and \
                not 0 <= args.first_seed <= scn.MAX_SEED - args.seeds:
            raise scn.ScenarioError(f"--first-seed: must be within 0..{scn.MAX_SEED}")
        if args.governor_cmd is not None and not args.governor_cmd.strip():
            raise scn.ScenarioError("--governor-cmd: must not be empty")
        redis_kind = _redis_args(args)
        if args.out is not None and (args.out.exists() and not args.out.is_dir() or any(
                args.out.glob("summary.json")) or any(args.out.glob("*/history/*.jsonl"))):
            # Each scenario's run directory would be refused (or, before, merged) one by one.
            raise scn.ScenarioError(f"--out {args.out} already holds a suite or is not a "
                                    f"directory; give a new directory")
    except scn.ScenarioError as exc:
        print(f"chaos suite: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    if redis_kind == "url" and (why := _reach(args.redis_url)):
        print(f"chaos suite: {why}", file=sys.stderr)
        return EXIT_HARNESS
    if args.conformance:
        code = _conformance_run("suite", args.governor, args.governor_cmd, None,
                                json_path=out / "conformance.json",
                                junit_path=out / "conformance-junit.xml",
                                logs=out / "conformance-logs")
        if code != EXIT_VALID:
            if code == EXIT_INVALID:
                print("chaos suite: the governor breaks the protocol in the cases above; the "
                      "chaos scenarios were not run (fix these first: `chaos conformance`)",
                      file=sys.stderr)
            return code
        print()
    print(HEADER)
    try:
        valid, _ = run_suite(out, governor=args.governor, governor_cmd=args.governor_cmd,
                             quick=args.quick, seeds=args.seeds, first_seed=args.first_seed,
                             names=args.scenarios,
                             redis_kind=redis_kind, redis_url=args.redis_url)
    except HarnessError as exc:
        print(f"chaos suite: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    except SuiteInterrupted as exc:
        print(f"\nsuite interrupted after {len(exc.outcomes)} scenario run(s); "
              f"summary in {out}/summary.md")
        return EXIT_UNKNOWN
    word = {True: "VALID", False: "INVALID", None: "UNKNOWN"}[valid]
    print(f"\nsuite verdict: {word}; summary in {out}/summary.md")
    return EXIT_VALID if valid is True else (EXIT_INVALID if valid is False else EXIT_UNKNOWN)


def _conformance(args: argparse.Namespace) -> int:
    from chaos import conformance as cf

    if args.list:
        for c in cf.CASES:
            print(f"{c.name:<28} {'required' if c.required else 'optional':<9} {c.title}")
        return EXIT_VALID
    if args.governor_cmd is not None and not args.governor_cmd.strip():
        print("chaos conformance: --governor-cmd: must not be empty", file=sys.stderr)
        return EXIT_BAD_ARGS
    try:
        cases = cf.select(args.cases)
    except ValueError as exc:
        print(f"chaos conformance: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    return _conformance_run("conformance", args.governor, args.governor_cmd, cases,
                            json_path=args.json, junit_path=args.junit, logs=args.logs)


def _conformance_run(command: str, governor: str, governor_cmd: str | None,
                     cases: list[Any] | None, *, json_path: Path | None = None,
                     junit_path: Path | None = None, logs: Path | None = None) -> int:
    """Run the conformance cases, one line each; 0 none failed, 1 some failed, 255 the
    governor never started (as ``chaos run``)."""
    from chaos import conformance as cf
    from chaos.redis_servers import RedisProviderError
    from chaos.runner import governor_spec

    spec = governor_spec(governor, governor_cmd)
    label = f"cmd:{governor_cmd}" if governor_cmd else governor
    print(f"conformance of {label} to docs/protocol.md:", flush=True)
    try:
        report = cf.run_conformance(spec, cases=cases, logs=logs, label=label,
                                    on_result=lambda r: print(r.line(), flush=True))
    except cf.ConformanceStartError as exc:
        print(f"chaos {command}: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    except RedisProviderError as exc:
        print(f"chaos {command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_HARNESS
    print(report.summary())
    for path, write in ((json_path, report.write_json), (junit_path, report.write_junit)):
        if path is not None:
            write(path)
            print(f"written {path}")
    return EXIT_VALID if report.passed else EXIT_INVALID


def _import(args: argparse.Namespace) -> int:
    from chaos import importer
    from chaos.checkers import check_run

    opts = importer.ImportOptions(prefix=args.prefix, redis_url=args.redis_url, rdb=args.rdb,
                                  since=args.since, until=args.until, out=args.out,
                                  progress=None if args.quiet else importer.ProgressLine())
    try:
        res = importer.import_run(opts)
    except importer.ImportArgumentError as exc:
        print(f"chaos import: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except importer.SourceUnavailable as exc:
        print(f"chaos import: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    m = res.meta
    c, led, mir = m["counts"], m["ledger"], m["mirror_vs_replay"]
    print(f"imported {c['plans']} plans, {c['decisions']} decisions, {c['results']} results "
          f"under {m['prefix']!r}; ledger: {led['orders']} orders derived from apply.result")
    print("  position mirror and replay " + ("agree" if mir["agree"] else
          f"differ: open only in the mirror {mir['mirror_only'][:10]}, only in the replay "
          f"{mir['replay_only'][:10]}"))
    verdict = check_run(res.run_dir)
    print(verdict.summary())
    if not args.no_report:
        from chaos.report import write_report

        paths = write_report(res.run_dir, verdict)
        print(f"report: {paths.html}")
    print(f"run directory: {res.run_dir}")
    return verdict.exit_code


def _report(run_dir: Path, minimize: Any = True) -> int:
    from chaos.report import write_report

    verdict = _judge(run_dir, "report", minimize)
    if isinstance(verdict, int):
        return verdict
    paths = write_report(run_dir, verdict)
    print(verdict.summary())
    print(f"written {paths.md}\nwritten {paths.html}")
    return int(verdict.exit_code)


def _notebook(args: argparse.Namespace) -> int:
    """Bad input (an unknown name, a run lacking what the notebook needs, a parameter it
    does not take) is one line and 254, checked before a kernel starts; a cell that fails
    otherwise is a harness failure (255) naming the cell and the saved notebook."""
    import json

    from chaos import notebook

    try:
        nb = notebook.resolve(args.name)
    except notebook.UnknownNotebook as exc:
        print(f"chaos notebook: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    params: dict[str, Any] = {}
    for key, value in args.param:
        if key not in nb.params:
            known = ", ".join(nb.params) or "none besides run_dir"
            print(f"chaos notebook: {nb.name} has no parameter {key!r} (its parameters: "
                  f"{known})", file=sys.stderr)
            return EXIT_BAD_ARGS
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    from chaos.analysis import MissingData
    from chaos.rundir import RunDirError

    try:
        done = notebook.execute(nb.name, args.run_dir, params, html=args.html,
                                progress=not args.quiet)
    except MissingData as exc:
        print(f"chaos notebook: {nb.name}: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except RunDirError as exc:  # damaged, not missing: the file is named
        print(f"chaos notebook: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    except notebook.NotebookFailed as exc:
        print(f"chaos notebook: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    print(f"written {done.ipynb}" + (f"\nwritten {done.html}" if done.html else ""))
    return EXIT_VALID


def _preflight(run_dir: Path, command: str) -> int | None:
    """None if ``run_dir`` can be judged; else the exit code, after one line naming the
    file: a verdict on a damaged run would blame the governor for the damage."""
    from chaos.rundir import NotARun, RunDirError, validate

    try:
        validate(run_dir)
    except NotARun as exc:
        print(f"chaos {command}: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except RunDirError as exc:
        print(f"chaos {command}: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    return None


def _history_error() -> type[Exception]:
    """The checkers' own "this line is not an operation", should one pass the pre-flight."""
    from chaos.checkers.facts import HistoryError

    return HistoryError
