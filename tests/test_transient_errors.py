"""Which Redis errors mean "retry later" (back off, decide nothing) rather than a bug."""

from __future__ import annotations

import pytest
from redis.exceptions import (
    ConnectionError,
    ExecAbortError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)

from governor_ref.governor import is_transient


@pytest.mark.parametrize("exc", [
    ConnectionError("Connection refused"),
    TimeoutError("Timeout reading from socket"),
    OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    ReadOnlyError("You can't write against a read only replica."),
    ResponseError("LOADING Redis is loading the dataset in memory"),
    ResponseError("Error running script (call to f_1): @user_script:224: @user_script: 224: "
                  "-OOM command not allowed when used memory > 'maxmemory'."),
    ExecAbortError("Transaction discarded because of: OOM command not allowed when used "
                   "memory > 'maxmemory'."),
])
def test_outages_and_refusals_are_transient(exc: Exception) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    ResponseError("ERR Error running script: @user_script:3: attempt to compare nil"),
    ValueError("bug"),
])
def test_bugs_are_not_transient(exc: Exception) -> None:
    assert not is_transient(exc)
