"""``chaos notebook``: run one of the shipped notebooks on a run directory, headless.

The notebooks (``notebooks/NN_name.py``, Jupytext percent format, paired with ``.ipynb``)
are executed with papermill into ``RUN_DIR/notebooks/NAME.ipynb`` and, with ``html=True``,
exported to a self-contained ``NAME.html`` without the code cells. What each notebook
needs from a run is declared here once (:data:`NOTEBOOKS`); the notebook's first cell calls
:func:`open_run` with the same declaration, so the command checks up front exactly what the
notebook would fail on, and names it in one line instead of a traceback deep in a cell.

The kernel is this interpreter's own: a kernel spec naming ``sys.executable`` is written to
a temporary directory put first on ``JUPYTER_PATH`` for the execution, so neither a
``python3`` spec installed elsewhere (another venv's, a system Jupyter's) nor the network
is involved.

Where the notebooks are: the repository's ``notebooks/`` is the source; ``chaos/notebooks``
is a symlink to it, so a wheel ships them as package data and an editable install or a
checkout finds them through the link (or beside the package, should the link be lost).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chaos.analysis import RunFrames

log = logging.getLogger(__name__)

KERNEL_NAME = "governor-audit"
FULL_CHECK_BYTES = 64 << 20  # history size up to which the check up front builds frames
MARKER_ENV = "CHAOS_NOTEBOOK_KERNEL"


@dataclass(frozen=True)
class Notebook:
    """One shipped notebook and what it needs from its run directory."""

    name: str
    shows: str
    needs: tuple[str, ...] = ()  # frames that must not be empty (RunFrames.require)
    # its parameters beyond run_dir -> what they are; all are paths (or lists of paths),
    # made absolute before they reach the kernel, whose cwd is RUN_DIR/notebooks/
    params: dict[str, str] = field(default_factory=dict)


NOTEBOOKS: dict[str, Notebook] = {nb.name: nb for nb in (
    Notebook("01_chaos_run_overview", "verdict, violations explained, open positions vs "
             "slots, decisions and blocks by reason, fault windows", ("plans", "decisions")),
    Notebook("02_slots_and_capital", "the slot semaphore and the capital reservations "
             "against the ledger: drift, lost or doubled releases, expired leases",
             ("decisions", "slot_leases")),
    Notebook("03_locks_and_ttls", "exit-lock holders per symbol, TTL expiries, locks that "
             "expired while their close was in flight, fencing tokens",
             ("decisions", "exit_locks")),
    Notebook("04_compare_governors", "runs or suites side by side: verdicts, violations "
             "per invariant, decision latency", (),
             {"run_dirs": "run or suite directories to compare (default: run_dir)"}),
    Notebook("05_load_test", "a load test: throughput, p50/p99 decision latency and block "
             "reasons over time, the verdict, Locust's own figures", ("decisions", "latency"),
             {"locust_csv_prefix": "Locust's --csv prefix (default: a *_stats_history.csv "
                                   "inside run_dir, if any)"}),
    Notebook("06_post_incident", "an imported incident: timeline, the checkers' findings, "
             "the violations explained", ("plans", "decisions")),
)}


class UnknownNotebook(ValueError):
    """A name that is none of :data:`NOTEBOOKS` (nor a unique prefix of one)."""


class NotebookFailed(RuntimeError):
    """A cell raised something else than MissingData: a harness or notebook defect."""


def resolve(name: str) -> Notebook:
    """``01``, ``01_chaos``, ``01_chaos_run_overview`` or ``…ipynb``/``…py`` -> the notebook."""
    key = Path(name).name.removesuffix(".ipynb").removesuffix(".py")
    if key in NOTEBOOKS:
        return NOTEBOOKS[key]
    hits = [nb for n, nb in NOTEBOOKS.items() if key and n.startswith(key)]
    if len(hits) == 1:
        return hits[0]
    what = "ambiguous" if hits else "unknown"
    raise UnknownNotebook(f"{what} notebook {name!r}; valid: {', '.join(NOTEBOOKS)} "
                          "(or their number, e.g. 01)")


def notebooks_dir() -> Path:
    """The directory holding the shipped ``.ipynb`` files (see the module docstring)."""
    pkg = Path(__file__).resolve().parent
    for d in (pkg / "notebooks", pkg.parent / "notebooks"):
        if (d / "jupytext.toml").is_file():
            return d
    raise FileNotFoundError(f"the notebooks are not installed (looked in {pkg / 'notebooks'} "
                            f"and {pkg.parent / 'notebooks'})")


def open_run(name: str, run_dir: str | Path) -> RunFrames:
    """The run loaded for notebook ``name``; raises MissingData naming what it lacks.

    The notebooks' first cell and the command's check up front are this one call.
    """
    from chaos.analysis import load_run

    run = load_run(Path(run_dir))
    needs = resolve(name).needs
    if needs:
        run.require(*needs)
    return run


def _history_bytes(run_dir: Path) -> int:
    from chaos.history import history_files

    return sum(p.stat().st_size for p in history_files(run_dir)) if run_dir.is_dir() else 0


def check(nb: Notebook, run_dir: Path, params: dict[str, Any]) -> None:
    """Raise MissingData before a kernel starts if the notebook would (one message).

    Above :data:`FULL_CHECK_BYTES` of history the frames are not built here: that read
    would be paid twice (here and in the kernel: 17 s more of a 10^6-operation run's
    52 s, measured), and the notebook's first cell raises the same MissingData, which
    :func:`execute` turns into the same one line. A missing or empty history is refused
    here whatever the size.
    """
    from chaos.analysis import MissingData

    if nb.name == "04_compare_governors":
        from chaos.analysis.compare import find_runs

        dirs = params.get("run_dirs") or [run_dir]
        if not find_runs(dirs):
            raise MissingData(f"no run directory in {', '.join(map(str, dirs))}")
        return
    if _history_bytes(run_dir) <= FULL_CHECK_BYTES:
        open_run(nb.name, run_dir)
    else:  # not a missing history (load_run refuses that at once): the first cell checks
        log.info("%s: a large history, checked by the notebook's first cell", run_dir)
    if nb.name == "05_load_test" and params.get("locust_csv_prefix"):
        from chaos.analysis.loadtest import stats_history_path

        stats_history_path(run_dir, params["locust_csv_prefix"])  # raises MissingData


@dataclass(frozen=True)
class Executed:
    ipynb: Path
    html: Path | None


def execute(name: str, run_dir: Path, params: dict[str, Any] | None = None, *,
            html: bool = False, progress: bool = True, check_first: bool = True) -> Executed:
    """Execute notebook ``name`` on ``run_dir`` into ``run_dir/notebooks/``.

    Raises UnknownNotebook, MissingData (checked up front unless ``check_first`` is False,
    and a cell's MissingData turned back into the same exception: one line either way),
    NotebookFailed for any other cell error. A Ctrl-C or SIGTERM stops the kernel and
    surfaces as KeyboardInterrupt.
    """
    from chaos.analysis import MissingData

    nb = resolve(name)
    run_dir = Path(run_dir).resolve()
    params = {k: _absolute(v) for k, v in (params or {}).items()}
    if check_first:
        check(nb, run_dir, params)
    import papermill as pm  # after the check: bad input is refused without its import
    from papermill.exceptions import PapermillExecutionError

    out_dir = run_dir / "notebooks"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"{nb.name}.ipynb"
    source = notebooks_dir() / f"{nb.name}.ipynb"
    with own_kernel() as (kernel, marker):
        try:
            _run_interruptibly(marker, lambda: pm.execute_notebook(
                source, out, parameters={"run_dir": str(run_dir), **params},
                kernel_name=kernel, language="python", progress_bar=progress, cwd=str(out_dir),
                start_timeout=120))
        except PapermillExecutionError as exc:
            if exc.ename == "MissingData":
                raise MissingData(exc.evalue) from None
            raise NotebookFailed(f"{nb.name}: cell [{exc.exec_count}] raised {exc.ename}: "
                                 f"{exc.evalue} (executed notebook: {out})") from None
    return Executed(out, export_html(out) if html else None)


def _run_interruptibly(marker: str, job: Callable[[], object]) -> None:
    """Run ``job`` (papermill) in a thread; a Ctrl-C or SIGTERM stops the kernel.

    Why a thread: while nbclient runs a kernel in the main thread it puts its own SIGINT
    and SIGTERM handlers on the event loop, and what a Ctrl-C then does depends on where
    it lands. In a thread it installs none; the main thread gets the KeyboardInterrupt
    (the command's SIGTERM handler raises one too), terminates the kernel's process group
    (SIGTERM: a kernel still importing would print a traceback on SIGINT) and kills it if
    it is not gone within 5 s.
    """
    box: list[BaseException] = []

    def target() -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box.append(exc)

    worker = threading.Thread(target=target, name="papermill", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            _signal_kernels(marker, sig)
            worker.join(wait)
            if not worker.is_alive():
                break
        raise
    if box:
        raise box[0]


def _signal_kernels(marker: str, sig: int) -> None:
    """Signal this process's kernels (their environment carries ``marker``) with their
    process groups (a kernel is its own session leader; a cell may have started children)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError):
            if child.environ().get(MARKER_ENV) == marker:
                os.killpg(child.pid, sig)


def _absolute(value: Any) -> Any:
    """A path parameter (a string or Path, or a list of them) as absolute strings: the
    kernel runs in RUN_DIR/notebooks/, not where the command was given; "" stays ""."""
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    if isinstance(value, Path) or (isinstance(value, str) and value):
        return str(Path(value).resolve())
    return value


@contextlib.contextmanager
def own_kernel() -> Iterator[tuple[str, str]]:
    """A kernel spec for ``sys.executable`` in a temp dir first on ``JUPYTER_PATH``.

    Why not ``python3``: that name resolves to whatever spec is found first (another
    venv's, a system Jupyter's), or to a ``python`` on PATH; the notebooks must run in the
    interpreter that has this package and its analysis layer. The connection file goes to
    the same temp dir (no user runtime dir needed) and the kernel gets an empty
    ``IPYTHONDIR`` (no profile startup scripts changing what a report shows). Yields the
    kernel name and the marker its processes carry in their environment.
    """
    with tempfile.TemporaryDirectory(prefix="chaos-kernel-") as tmp:
        spec = Path(tmp) / "kernels" / KERNEL_NAME
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.log_level=ERROR"],
            "env": {MARKER_ENV: tmp, "IPYTHONDIR": str(Path(tmp) / "ipython")},
            "display_name": f"governor-audit ({sys.executable})", "language": "python",
            "metadata": {"debugger": False}}))
        env = {"JUPYTER_PATH": os.pathsep.join(filter(None, (tmp, os.environ.get(
            "JUPYTER_PATH")))), "JUPYTER_RUNTIME_DIR": str(Path(tmp) / "runtime")}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield KERNEL_NAME, tmp
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# JupyterLab's page without what it loads from the network (require.js, MathJax, mermaid):
# the notebooks draw with matplotlib (PNG outputs, embedded as data: URIs) and write no
# LaTeX, so the export needs none of it and opens offline.
_HTML_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def export_html(ipynb: Path) -> Path:
    """``NAME.html`` beside ``ipynb``: outputs only (no code cells, no prompts), images
    embedded, nothing fetched from the network."""
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file="chaos-report.html.j2",
                            extra_loaders=[DictLoader({"chaos-report.html.j2": _HTML_TEMPLATE})],
                            exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True)
    exporter.log.setLevel(logging.ERROR)  # not "alternative text is missing" per figure
    body, _ = exporter.from_notebook_node(nbformat.read(ipynb, as_version=4))
    out = ipynb.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out
