# %% [markdown]
# # Chaos run overview
#
# One run directory (`chaos run`, a run of a `chaos suite`, a load test, an import): the
# verdict, each violation explained with the events that make it one, open positions
# against the slots over time, decisions and blocks by reason, with the fault windows
# shaded on every time axis.
#
# Headless: `chaos notebook 01 RUN_DIR --html` (writes `RUN_DIR/notebooks/`). In JupyterLab
# set `run_dir` below.

# %% tags=["parameters"]
run_dir = "../reports/runs/open-storm/latest"

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from chaos.analysis import plots, story
from chaos.notebook import open_run

run = open_run("01_chaos_run_overview", run_dir)  # MissingData names what this run lacks
display(Markdown(story.header(run)))

# %% [markdown]
# ## Verdict
# Each checker's result; UNKNOWN means the history cannot decide or the run did not
# exercise the governor, never a pass.

# %%
story.invariants(run)

# %% [markdown]
# ## Violations, explained

# %%
display(Markdown(story.violations(run)))

# %% [markdown]
# The events of the first violation (decisions, orders and results, in seconds since
# time 0); `story.violation_events(run, i)` shows the i-th.

# %%
story.violation_events(run, 0)

# %% [markdown]
# ## Minimal witnesses
# For each violation (the first few of each invariant), the fewest operations that still
# show it when its checker is run on them alone, in time order (`n` numbers the
# violation; `run.minimal_witnesses`, docs/analysis.md).

# %%
run.minimal_witnesses[["n", "invariant", "t", "f", "type", "plan_id", "symbol", "action",
                       "outcome", "detail"]]

# %% [markdown]
# ## Open positions against the slots
# Violations are marked where they happened; shaded bands are the fault windows.

# %%
plots.positions(run)

# %% [markdown]
# ## Decisions and blocks by reason

# %%
plots.decisions_by_reason(run)

# %%
plots.block_reasons_over_time(run)

# %% [markdown]
# ## Fault windows and governor processes

# %%
story.timeline(run)
