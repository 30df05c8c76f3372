"""One loader for the reference governor's Lua scripts.

Each script lives in ``lua/<name>.lua`` with a header naming the
interleaving it rules out; ``lua/lib.lua`` is prepended to every one.
Scripts are called by SHA (EVALSHA). After a Redis restart or failover the
script cache is empty: :meth:`ScriptSet.run_batch` reloads on NOSCRIPT and
re-sends only the calls that failed. That retry is safe because every
script is idempotent (the decision record / result marker is checked first).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError, ResponseError

SCRIPT_NAMES = ("decide_open", "decide_close", "decide_block", "apply_result", "reconcile")


@cache
def _source(name: str) -> str:
    pkg = resources.files("governor_ref") / "lua"
    lib = (pkg / "lib.lua").read_text(encoding="utf-8")
    body = (pkg / f"{name}.lua").read_text(encoding="utf-8")
    return f"{lib}\n-- ===== {name}.lua =====\n{body}"


@dataclass(frozen=True)
class LuaScript:
    name: str
    source: str
    sha: str

    @classmethod
    def named(cls, name: str) -> LuaScript:
        src = _source(name)
        return cls(name, src, hashlib.sha1(src.encode()).hexdigest())


Call = tuple[LuaScript, list[str], list[str]]  # script, keys, args


def _is_noscript(exc: BaseException) -> bool:
    return isinstance(exc, NoScriptError) or (
        isinstance(exc, ResponseError) and str(exc).startswith("NOSCRIPT")
    )


class ScriptSet:
    """The scripts, by name, with batched calls that survive a flushed script cache."""

    def __init__(self) -> None:
        self.scripts = {n: LuaScript.named(n) for n in SCRIPT_NAMES}

    def __getitem__(self, name: str) -> LuaScript:
        return self.scripts[name]

    def load(self, r: redis.Redis) -> None:
        for s in self.scripts.values():
            r.script_load(s.source)

    def run(self, r: redis.Redis, script: LuaScript, keys: list[str], args: list[str]) -> Any:
        """One call; raises what the server raised."""
        res = self.run_batch(r, [(script, keys, args)])[0]
        if isinstance(res, BaseException):
            raise res
        return res

    def run_batch(self, r: redis.Redis, calls: list[Call]) -> list[Any]:
        """EVALSHA every call in one pipeline; reload and re-send on NOSCRIPT.

        Returns one result per call; a call that failed for another reason
        has its exception in its place (the caller decides, nothing is acked).
        """
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _attempt in range(3):
            pipe = r.pipeline(transaction=False)
            for i in todo:
                s, keys, args = calls[i]
                pipe.evalsha(s.sha, len(keys), *keys, *args)
            out = pipe.execute(raise_on_error=False)
            missing = []
            for i, res in zip(todo, out, strict=True):
                if isinstance(res, Exception) and _is_noscript(res):
                    missing.append(i)
                else:
                    results[i] = res
            if not missing:
                return results
            for name in {calls[i][0].name for i in missing}:
                r.script_load(self.scripts[name].source)
            todo = missing
        for i in todo:
            results[i] = NoScriptError(f"script {calls[i][0].name} could not be loaded")
        return results
