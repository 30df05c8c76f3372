# %% [markdown]
# # Compare governors
#
# The same scenarios and seeds across governors (reference, seed, legacy, yours): one row
# per run, found in or under each directory of `run_dirs` (run directories, `chaos suite`
# outputs, `reports/suites/`). For instance, after
# `chaos suite --quick --out reports/cmp/reference` and
# `chaos suite --quick --governor seed --out reports/cmp/seed`:
# `chaos notebook 04 reports/cmp --html`.

# %% tags=["parameters"]
run_dir = "../reports/suites"
run_dirs = []  # default: [run_dir]

# %%
# %matplotlib inline
from chaos.analysis import compare

table = compare.compare_runs(run_dirs or [run_dir])  # MissingData when no run is found
for skipped_dir, why in table.attrs["skipped"]:  # damaged or unfinished runs
    print(f"left out {skipped_dir}: {why}")
table.drop(columns=["run_dir"])

# %% [markdown]
# ## Violations per invariant

# %%
compare.plot_violations(table)

# %% [markdown]
# ## Decision latency (plan entry to decision entry)

# %%
compare.plot_latency(table)
