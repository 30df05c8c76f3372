"""The load test's command-line options (added to Locust's parser) and the task mix.

Locust sends every parsed option to its workers with the test start (``parsed_options``
in the spawn message), so what the master sets here before spawning, including the
hidden ``--lt-world-*`` options that carry the world's Redis URL, prefix and run
directory, reaches every worker.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chaos.loadtest.world import HARNESS_THREADS
from chaos.runner import VARIANTS, check_out
from chaos.scenario import ScenarioError

TASKS = ("open", "close", "stale", "malformed")
DEFAULT_MIX = "open=70,close=20,stale=5,malformed=5"
DEFAULT_RATE = 200.0
DEFAULT_DEADLINE_S = 5.0


class OptionError(ValueError):
    """A bad option value; the message names the option."""


def parse_mix(text: str) -> dict[str, float]:
    """``open=70,close=20,stale=5,malformed=5`` -> weights (not necessarily summing to
    100); every task named must be known and at least one weight positive."""
    out: dict[str, float] = dict.fromkeys(TASKS, 0.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in TASKS:
            raise OptionError(f"--mix: {part!r} is not TASK=WEIGHT with TASK one of "
                              f"{', '.join(TASKS)}")
        try:
            weight = float(value)
        except ValueError:
            raise OptionError(f"--mix: weight of {name} must be a number, got {value!r}") \
                from None
        if not 0 <= weight < float("inf"):
            raise OptionError(f"--mix: weight of {name} must be >= 0, got {value!r}")
        out[name] = weight
    if not any(out.values()):
        raise OptionError("--mix: at least one weight must be positive")
    return out


def add_arguments(parser: Any) -> None:
    """Add the load test's options to Locust's parser (``init_command_line_parser``)."""
    # On the parser itself: Locust's add_argument (include_in_web_ui, is_secret) is not on
    # argument groups. None is shown in the web UI's form: the world starts once, with the
    # command line's options (see fixed()), and the form would show --redis-url's password.
    class _Hidden:
        def add_argument(self, *names: str, **kw: Any) -> Any:
            action = parser.add_argument(*names, include_in_web_ui=False, **kw)
            OPTION_DESTS.append(action.dest)
            return action

    OPTION_DESTS.clear()
    g = _Hidden()
    g.add_argument("--governor", default="reference", choices=VARIANTS,
                   help="governor variant started against the embedded Redis")
    g.add_argument("--governor-cmd", default="",
                   help="command that starts your governor (as in `chaos run`)")
    g.add_argument("--governors", type=int, default=2, help="governor instances")
    g.add_argument("--symbols", type=int, default=40, help="symbols the opens spread over")
    g.add_argument("--mix", default=DEFAULT_MIX, help="task weights, e.g. " + DEFAULT_MIX)
    g.add_argument("--rate", type=float, default=DEFAULT_RATE,
                   help="target plans/s per Locust process (open model, fixed schedule)")
    g.add_argument("--max-rate", type=float, default=0.0,
                   help="refuse a --rate above this (0: no ceiling; staging)")
    g.add_argument("--max-p99-ms", type=float, default=0.0,
                   help="exit 1 when the HDR p99 decision latency is above this (0: off)")
    g.add_argument("--decision-deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                   help="a plan undecided after this is a failure")
    g.add_argument("--run-dir", default="",
                   help="run directory (default reports/loadtests/<time>/, with a latest link)")
    g.add_argument("--redis-url", default="", is_secret=True,
                   help="target an existing (staging) Redis instead of an embedded one")
    g.add_argument("--prefix", default="", help="key prefix on --redis-url")
    g.add_argument("--external-governor", action="store_true", default=False,
                   help="drive a governor already running on --redis-url with --prefix")
    g.add_argument("--own-executor", action="store_true", default=False,
                   help="the system under test executes its permits itself: start no apply "
                        "layer and no exchange; measure decisions, skip the ledger checks")
    g.add_argument("--harness-threads", choices=HARNESS_THREADS, default="idle",
                   help="CPU policy of the harness's apply layer and recorder threads: idle "
                        "(Linux SCHED_IDLE: they yield the CPU to Redis, the governors and "
                        "Locust, so they stay out of the latency measured) or normal")
    g.add_argument("--allow-remote-redis", "--allow-remote", dest="allow_remote_redis",
                   action="store_true", default=False,
                   help="allow a non-loopback --redis-url")
    g.add_argument("--owned-prefix", action="store_true", default=False,
                   help="--prefix is the load test's own: accept the keys found there")
    # Set by the master once the world is up; they reach the workers with the test start.
    for name in ("--lt-world-url", "--lt-world-prefix", "--lt-world-run-dir"):
        g.add_argument(name, default="", help=argparse.SUPPRESS)


OPTION_DESTS: list[str] = []  # the load test's options (add_arguments fills it)


def fixed(opts: Any) -> dict[str, Any]:
    """The load test's option values, to restore when something changed them after the
    start: the web UI's ``POST /swarm`` writes any form field that names an option into
    ``parsed_options``, and a run's world, rate ceiling and checks are set at start."""
    return {k: getattr(opts, k) for k in OPTION_DESTS if hasattr(opts, k)}


def restore(opts: Any, values: Mapping[str, Any]) -> list[str]:
    """Put ``values`` (from :func:`fixed`) back into ``opts``; returns the options that
    had changed."""
    changed = [k for k, v in values.items() if getattr(opts, k, v) != v]
    for k in changed:
        setattr(opts, k, values[k])
    return changed


def validate(opts: Any) -> dict[str, float]:
    """Check the options' values before anything starts; returns the parsed mix."""
    mix = parse_mix(opts.mix)
    if opts.rate <= 0:
        raise OptionError(f"--rate must be > 0 plans/s, got {opts.rate}")
    if opts.max_rate and opts.rate > opts.max_rate:
        raise OptionError(f"--rate {opts.rate:g} is above --max-rate {opts.max_rate:g}")
    if not 1 <= opts.governors <= 64:
        raise OptionError(f"--governors must be in [1, 64], got {opts.governors}")
    if not 1 <= opts.symbols <= 1000:
        raise OptionError(f"--symbols must be in [1, 1000], got {opts.symbols}")
    if opts.decision_deadline_s <= 0:
        raise OptionError("--decision-deadline-s must be > 0")
    if getattr(opts, "run_dir", None):
        # A second run in the same directory would add its history to the first's and
        # reuse its ledger (its open positions too): the checkers would judge the mix.
        try:
            check_out(Path(opts.run_dir))
        except ScenarioError as exc:
            raise OptionError(str(exc).replace("--out", "--run-dir", 1)) from exc
    return mix


def settings(opts: Any, mix: Mapping[str, float]) -> dict[str, Any]:
    """The options as recorded in run.json (``loadtest``), never a password."""
    from chaos.redis_servers import redact_url

    return {"governor": f"cmd:{opts.governor_cmd}" if opts.governor_cmd else opts.governor,
            "governors": opts.governors, "symbols": opts.symbols, "mix": dict(mix),
            "rate": opts.rate, "max_p99_ms": opts.max_p99_ms or None,
            "decision_deadline_s": opts.decision_deadline_s,
            "users": getattr(opts, "num_users", None),
            "run_time": getattr(opts, "run_time", None),
            "processes": getattr(opts, "processes", None),
            "redis_url": redact_url(opts.redis_url) if opts.redis_url else None,
            "prefix": opts.prefix or None, "external_governor": opts.external_governor,
            "own_executor": opts.own_executor, "harness_threads": opts.harness_threads}
