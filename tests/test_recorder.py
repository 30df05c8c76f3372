"""The recorder brings every stream entry into the history, whatever bytes it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chaos.history import F, HistoryWriter, read_history
from chaos.recorder import StreamRecorder
from governor_ref.keys import Keys


def test_non_utf8_plans_do_not_stop_the_recorder(shared_redis: Any, prefix: str,
                                                 tmp_path: Path) -> None:
    k = Keys(prefix)
    r = shared_redis.client(decode_responses=False)
    r.xadd(k.plans, {"plan_id": b"bad-1", "symbol": b"\xff\xfe\xc3"})
    r.xadd(k.plans, {"plan_id": "ok-1", "symbol": "AAUSDT", "action": "OPEN"})
    r.xadd(k.events, {"plan_id": "bad-1", "decision": "BLOCK", "reason": "invalid_plan"})
    r.xadd(k.events, {"plan_id": "ok-1", "decision": "PERMIT", "reason": ""})
    w = HistoryWriter(tmp_path, "recorder")
    rec = StreamRecorder(lambda: shared_redis.client(decode_responses=False), k, w)
    rec.drain(r)
    w.close()
    ops = read_history(tmp_path)
    assert [op.key for op in ops if op.f == F.PLAN] == ["bad-1", "ok-1"]
    assert [op.key for op in ops if op.f == F.DECISION] == ["bad-1", "ok-1"]
    assert next(op for op in ops if op.key == "bad-1").value["symbol"] == "\ufffd\ufffd\ufffd"


def test_a_stream_that_restarts_below_the_cursor_is_reread(shared_redis: Any, prefix: str,
                                                           tmp_path: Path) -> None:
    k = Keys(prefix)
    r = shared_redis.client(decode_responses=False)
    r.xadd(k.events, {"plan_id": "a", "decision": "PERMIT"}, id="9000000000000-0")
    w = HistoryWriter(tmp_path, "recorder")
    rec = StreamRecorder(lambda: shared_redis.client(decode_responses=False), k, w)
    rec.drain(r)
    r.delete(k.events)  # Redis lost its data and the stream starts again
    r.xadd(k.events, {"plan_id": "b", "decision": "PERMIT"})
    rec._check_reset(r)
    rec.drain(r)
    w.close()
    ops = read_history(tmp_path)
    assert [op.key for op in ops if op.f == F.DECISION] == ["a", "b"]
    assert any(op.f == F.PHASE and op.key == "stream_reset" for op in ops)
