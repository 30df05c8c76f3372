# %% [markdown]
# # Load test
#
# A Locust load test's run directory (`locust -f loadtests/locustfile.py ... --run-dir
# DIR --csv PREFIX`): throughput, p50/p99 decision latency and block reasons over time,
# the invariant verdict, and Locust's own stats history beside them.
#
# Headless: `chaos notebook 05 RUN_DIR --html -p locust_csv_prefix PREFIX` (the prefix is
# not needed when the CSV was written inside the run directory, `--csv RUN_DIR/locust`).

# %% tags=["parameters"]
run_dir = "../reports/loadtests/latest"
locust_csv_prefix = ""  # the --csv PREFIX given to locust (empty: one inside run_dir)

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from chaos.analysis import loadtest, plots, story
from chaos.notebook import open_run

run = open_run("05_load_test", run_dir)  # MissingData names what this run lacks
display(Markdown(story.header(run)))

# %% [markdown]
# ## The verdict

# %%
story.invariants(run)

# %%
display(Markdown(story.violations(run)))

# %% [markdown]
# ## Decision latency and throughput over time
# Measured by the harness from the plan stream entry to the decision entry.

# %%
plots.latency(run)

# %% [markdown]
# ## Block reasons over time

# %%
plots.block_reasons_over_time(run)

# %%
plots.decisions_by_reason(run)

# %% [markdown]
# ## Locust's view
# Locust's stats history (its percentiles are whole milliseconds; the harness's latency
# above is the one to trust).

# %%
stats = loadtest.locust_stats(run, locust_csv_prefix or None)
loadtest.plot_locust(stats, run)

# %%
loadtest.aggregated(stats)
