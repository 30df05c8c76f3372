"""``chaos check`` / ``chaos report`` on damaged or incomplete run directories.

A verdict must come from a whole run: a missing or unreadable ledger, history or run.json
is one line naming the file and exit 255 (a missing ledger used to give INVALID with dozens
of violations); a directory that holds no run (every history file empty) is exit 254. One
real run is made per module; each test damages a copy of it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from govtools import small_scenario


def chaos(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chaos", *args], capture_output=True,
                          text=True, timeout=180, cwd=cwd)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("damaged")
    spec = tmp / "s.toml"
    spec.write_text(small_scenario("dmg", 1.5))
    out = tmp / "run"
    p = chaos("run", "--scenario", str(spec), "--out", str(out), "--quiet", "--no-report",
              "--probe-max-wait", "5", cwd=tmp)
    assert p.returncode == 0, p.stdout + p.stderr
    (out / "results.json").unlink()
    return out


@pytest.fixture
def copy(pristine: Path, tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(pristine, d)
    return d


def _biggest_history(d: Path) -> Path:
    return max((d / "history").glob("*.jsonl"), key=lambda p: p.stat().st_size)


def _corrupt_middle_line(d: Path) -> None:
    p = _biggest_history(d)
    lines = p.read_bytes().splitlines(keepends=True)
    assert len(lines) > 4
    lines[len(lines) // 2] = b'{"type": "ok", "f": \n'
    p.write_bytes(b"".join(lines))


def _ledger_not_a_database(d: Path) -> None:
    (d / "ledger.sqlite").write_bytes(b"this is not an SQLite file\n" * 100)


def _ledger_a_directory(d: Path) -> None:
    (d / "ledger.sqlite").unlink()
    (d / "ledger.sqlite").mkdir()


def _ledger_empty_database(d: Path) -> None:
    import sqlite3

    (d / "ledger.sqlite").unlink()
    sqlite3.connect(d / "ledger.sqlite").close()


def _history_a_directory(d: Path) -> None:
    (d / "history" / "zz.jsonl").mkdir()


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "ledger-missing": (lambda d: (d / "ledger.sqlite").unlink(), "ledger.sqlite"),
    "ledger-not-a-database": (_ledger_not_a_database, "ledger.sqlite"),
    "ledger-a-directory": (_ledger_a_directory, "ledger.sqlite"),
    "ledger-without-orders": (_ledger_empty_database, "ledger.sqlite"),
    "run-json-missing": (lambda d: (d / "run.json").unlink(), "run.json"),
    "run-json-invalid": (lambda d: (d / "run.json").write_text('{"status": "compl'),
                         "run.json"),
    "run-json-not-an-object": (lambda d: (d / "run.json").write_text("[1, 2]"), "run.json"),
    "run-json-bad-config": (lambda d: (d / "run.json").write_text(
        '{"governor_config": {"slots_BASE": "many"}}'), "run.json"),
    "history-corrupt-middle-line": (_corrupt_middle_line, ".jsonl:"),
    "history-a-directory": (_history_a_directory, "zz.jsonl"),
}


@pytest.mark.parametrize("command", ["check", "report"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_run_is_one_line_naming_the_file_never_a_verdict(
        copy: Path, command: str, damage: str) -> None:
    damage_fn, names = DAMAGE[damage]
    damage_fn(copy)
    p = chaos(command, str(copy))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 255, p.stdout + p.stderr
    assert len(lines) == 1 and names in lines[0], p.stderr
    assert "verdict" not in p.stdout.lower() and not (copy / "results.json").exists()


@pytest.mark.parametrize("command", ["check", "report"])
def test_all_history_files_empty_is_not_a_run(copy: Path, command: str) -> None:
    for p in (copy / "history").glob("*.jsonl"):
        p.write_bytes(b"")
    p = chaos(command, str(copy))
    assert p.returncode == 254, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "not a run" in p.stderr
    assert not (copy / "results.json").exists()


def test_a_torn_last_line_is_still_judged(copy: Path) -> None:
    """What a writer killed mid-line leaves: the checkers skip it, so must the pre-flight."""
    p = _biggest_history(copy)
    p.write_bytes(p.read_bytes() + b'{"type": "invoke", "f": "sub')
    from chaos import rundir

    rundir.validate(copy)
    res = chaos("check", str(copy))
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_pristine_run_passes_the_preflight(pristine: Path) -> None:
    from chaos import rundir

    rundir.validate(pristine)


def test_a_run_directory_is_refused_as_out(copy: Path) -> None:
    before = sorted(p.name for p in (copy / "history").iterdir())
    p = chaos("run", "--scenario", "open-storm", "--out", str(copy))
    assert p.returncode == 254 and "--out" in p.stderr, p.stdout + p.stderr
    assert sorted(p.name for p in (copy / "history").iterdir()) == before
