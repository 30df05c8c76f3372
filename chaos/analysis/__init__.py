"""The analysis layer: any run directory as pandas frames, and the plots drawn from them.

``load_run(run_dir)`` reads a run once and returns :class:`RunFrames` (frames built
lazily, cached); :mod:`chaos.analysis.plots` draws matplotlib Figures from it. The
report (``chaos.report``) and the notebooks use both, so their figures cannot disagree.
See docs/analysis.md.
"""

from chaos.analysis.frames import COLUMNS, MissingData, RunFrames, load_run

__all__ = ["COLUMNS", "MissingData", "RunFrames", "load_run"]
from chaos.analysis.compare import compare_runs  # noqa: E402 - nbinfra's, after frames
from chaos.analysis.loadtest import locust_stats  # noqa: E402

__all__ += ["compare_runs", "locust_stats"]
