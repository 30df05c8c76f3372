# %% [markdown]
# # Locks and TTLs
#
# Every CLOSE permit holds the symbol's exit lock from its decision until its close
# reaches the exchange (or fails, or the permit lapses); rotation closes, which a governor
# emits to free a slot, hold the rotation lock. Two holders on one symbol at once, a lock
# whose TTL expired while its close was still in flight, and fencing tokens that do not
# increase are how double closes happen.
#
# Headless: `chaos notebook 03 RUN_DIR --html`.

# %% tags=["parameters"]
run_dir = "../reports/runs/duplicate-close/latest"

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from chaos.analysis import plots, story
from chaos.notebook import open_run

run = open_run("03_locks_and_ttls", run_dir)  # MissingData names what this run lacks
display(Markdown(story.header(run)))

# %% [markdown]
# ## Exit-lock holders per symbol
# Bars are CLOSE permits from decision to end; ticks mark the TTL expiry; overlaps on one
# symbol are marked.

# %%
plots.exit_locks(run)

# %% [markdown]
# Exit locks and rotation locks, and how they ended:

# %%
story.lock_ends(run)

# %% [markdown]
# ## Two holders at once

# %%
story.lock_overlaps(run)

# %% [markdown]
# ## Locks that expired while their close was in flight

# %%
story.expired_in_flight(run)

# %% [markdown]
# ## Fencing tokens
# Per symbol: CLOSE permits, how many carried a fence, and how many fences did not
# increase over the previous permit (a stale holder could still write).

# %%
story.fence_checks(run)

# %% [markdown]
# ## single_close, explained

# %%
story.invariants(run).loc[["single_close"]]

# %%
display(Markdown(story.violations(run)))
