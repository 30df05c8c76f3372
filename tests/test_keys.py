"""The Lua prelude and the Python modules name the same keys and defaults."""

from __future__ import annotations

import re
from dataclasses import fields
from importlib import resources

from governor_ref.keys import Keys
from governor_ref.protocol import GovernorConfig


def _lib() -> str:
    return (resources.files("governor_ref") / "lua" / "lib.lua").read_text()


def test_lua_key_templates_match_keys_module() -> None:
    lib = _lib()
    k = Keys("PFX")
    table = dict(re.findall(r"^\s+(\w+) = P \.\. '([^']+)',", lib, re.M))
    expected = {
        "config": k.config, "regime": k.regime, "capital": k.capital,
        "exposure": k.exposure_pct, "plans": k.plans, "events": k.events,
        "results": k.results, "positions": k.positions, "leases": k.leases,
        "lease_expiry": k.lease_expiry, "opening": k.opening, "closing": k.closing,
        "fence": k.fence, "rotation_lock": k.rotation_lock, "last_seen": k.last_seen,
    }
    assert {n: "PFX" + t for n, t in table.items()} == expected
    funcs = dict(re.findall(r"local function (k_\w+)\(\w+\) return P \.\. '([^']+)' \.\.", lib))
    assert "PFX" + funcs["k_allocation"] + "X" == k.allocation("X")
    assert "PFX" + funcs["k_position"] + "X" == k.position("X")
    assert "PFX" + funcs["k_permit"] + "X" == k.permit("X")
    assert "PFX" + funcs["k_exit_lock"] + "X" == k.exit_lock("X")
    assert "PFX" + funcs["k_decision"] + "X" == k.decision("X")
    assert "PFX" + funcs["k_result_seen"] + "X" == k.result_seen("X")
    assert "PFX" + funcs["k_closed"] + "X" == k.closed_position("X")


def test_lua_config_defaults_match_governor_config() -> None:
    block = _lib().split("local DEFAULTS = {", 1)[1].split("}", 1)[0]
    lua = dict(re.findall(r"(\w+) = '([^']*)'", block))
    py = GovernorConfig().to_hash()
    assert lua == py
    assert set(lua) == {f.name for f in fields(GovernorConfig) if f.name != "extra"}
