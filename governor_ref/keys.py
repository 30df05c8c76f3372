"""Every Redis key name the governors and the harness use, in one place.

The wire contract fixes the public names (config, streams, permits, the
position mirror). The reference governor's private state lives under
``P:gov:*``; the seed and legacy variants use the key names their design
document gives (``P:slots:available``, ``P:exit:lock:{symbol}``...).

The Lua scripts build symbol-dependent names from the prefix with the same
templates (``governor_ref/lua/lib.lua``, table ``K``); a test checks that the
two lists agree.
"""

from __future__ import annotations

from dataclasses import dataclass

# Consumer groups fixed by the protocol.
GROUP_GOVERNOR = "governor"
GROUP_GOVERNOR_RESULTS = "governor-results"
GROUP_APPLY = "apply"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix ``P`` (``quantum`` by default, ``{quantum}`` on Cluster)."""

    prefix: str = "quantum"

    def _k(self, suffix: str) -> str:
        return f"{self.prefix}:{suffix}"

    # -- inputs written by the harness / operator ---------------------------------
    @property
    def config(self) -> str:
        return self._k("governor:config")

    @property
    def regime(self) -> str:
        return self._k("slots:regime")

    @property
    def capital(self) -> str:
        return self._k("portfolio:capital")

    @property
    def exposure_pct(self) -> str:
        return self._k("portfolio:exposure_pct")

    def allocation(self, symbol: str) -> str:
        return self._k(f"capital:allocation:{symbol}")

    def position(self, symbol: str) -> str:
        return self._k(f"position:{symbol}")

    @property
    def position_pattern(self) -> str:
        return self._k("position:*")

    # -- streams --------------------------------------------------------------------
    @property
    def plans(self) -> str:
        return self._k("stream:apply.plan")

    @property
    def events(self) -> str:
        return self._k("stream:governor.events")

    @property
    def results(self) -> str:
        return self._k("stream:apply.result")

    # -- outputs -----------------------------------------------------------------------
    def permit(self, plan_id: str) -> str:
        return self._k(f"permit:{plan_id}")

    # -- seed-design keys (seed and legacy variants; also documented in the seed) ----
    @property
    def slots_available(self) -> str:
        return self._k("slots:available")

    @property
    def slots_desired(self) -> str:
        return self._k("slots:desired")

    def capital_reserved(self, symbol: str) -> str:
        return self._k(f"capital:reserved:{symbol}")

    def exit_lock(self, symbol: str) -> str:
        return self._k(f"exit:lock:{symbol}")

    def rotation_lock_for(self, plan_id: str) -> str:
        return self._k(f"rotation:lock:{plan_id}")

    # -- reference governor private state (P:gov:*) -----------------------------------
    def decision(self, plan_id: str) -> str:
        """The one decision a plan ever gets (idempotency record)."""
        return self._k(f"gov:decision:{plan_id}")

    def result_seen(self, plan_id: str) -> str:
        """Marks an apply result as applied, so redelivery is a no-op."""
        return self._k(f"gov:result:{plan_id}")

    @property
    def positions(self) -> str:
        """HASH symbol -> JSON of the positions the governor counts as open."""
        return self._k("gov:positions")

    @property
    def leases(self) -> str:
        """HASH plan_id -> JSON of a permitted, not yet settled plan (slot / capital / exit)."""
        return self._k("gov:leases")

    @property
    def lease_expiry(self) -> str:
        """ZSET plan_id by lease expiry (ms), so expired leases are reaped in order."""
        return self._k("gov:lease_expiry")

    @property
    def opening(self) -> str:
        """HASH symbol -> plan_id of the OPEN permitted and not yet settled."""
        return self._k("gov:opening")

    @property
    def closing(self) -> str:
        """HASH symbol -> plan_id of the CLOSE permitted and not yet settled (the exit lock)."""
        return self._k("gov:closing")

    @property
    def fence(self) -> str:
        """Monotonic fencing-token counter for CLOSE permits."""
        return self._k("gov:fence")

    @property
    def last_seen(self) -> str:
        """Server time (ms) of the reference's last script: a longer gap ages no lease."""
        return self._k("gov:last_seen")

    @property
    def rotation_lock(self) -> str:
        """The reference's single rotation lock (holder: the rotation plan id)."""
        return self._k("gov:rotation:lock")

    def closed_position(self, position_id: str) -> str:
        """Marks a position id as closed, so a late OPEN result cannot resurrect it."""
        return self._k(f"gov:closed:{position_id}")

    def all_private_patterns(self) -> list[str]:
        return [self._k("gov:*")]
