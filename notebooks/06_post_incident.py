# %% [markdown]
# # Post-incident review
#
# What production recorded, imported with `chaos import` (from a live Redis, read-only,
# or from a dump) and judged by the same checkers as a chaos run: the incident's timeline,
# the checkers' findings with the events behind each, and the figures of the report. The
# ledger of an import is derived from the executor's results and the regime history
# before the import is unknown (the caveats are listed first).
#
# Headless: `chaos notebook 06 reports/imports/PREFIX/latest --html`.

# %% tags=["parameters"]
run_dir = "../reports/imports/quantum/latest"

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from chaos.analysis import plots, story
from chaos.notebook import open_run

run = open_run("06_post_incident", run_dir)  # MissingData names what this run lacks
display(Markdown(story.header(run)))

# %% [markdown]
# ## Timeline
# Faults (a chaos run), governor process events, the first and last decision and every
# violation, in time order.

# %%
story.timeline(run)

# %% [markdown]
# ## The checkers' findings

# %%
story.invariants(run)

# %%
display(Markdown(story.violations(run)))

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
# ## The figures of the report
# The same functions draw `report.html` (`chaos report RUN_DIR`).

# %%
plots.positions(run)

# %%
plots.exit_locks(run)

# %%
plots.capital(run)

# %%
plots.decisions_by_reason(run)

# %%
plots.latency(run)
