# %% [markdown]
# # Slots and capital
#
# How the slot semaphore and the capital reservations moved against the ledger: every
# OPEN permit is a slot lease from its decision to its end (executed, expired at its TTL,
# aborted); the exchange's open positions are the ground truth. Where the two drift apart
# the tables below say when, by how much, and which permits were involved.
#
# Headless: `chaos notebook 02 RUN_DIR --html`.

# %% tags=["parameters"]
run_dir = "../reports/runs/open-storm/latest"

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from chaos.analysis import plots, story
from chaos.notebook import open_run

run = open_run("02_slots_and_capital", run_dir)  # MissingData names what this run lacks
display(Markdown(story.header(run)))

# %% [markdown]
# ## Open positions against the slots

# %%
plots.positions(run)

# %% [markdown]
# Episodes with more positions open on the exchange than the slots in force (each is a
# drift of the semaphore from the ledger):

# %%
story.over_limit(run)

# %% [markdown]
# ## Slot leases (OPEN permits)
# Each lease from decision to end, and how many were outstanding against the slots.
# A lease that ends *expired* lapsed at its TTL without an order: its slot came back by
# expiry, not by a release.

# %%
plots.slot_leases(run)

# %%
story.ends(run.slot_leases)

# %% [markdown]
# The leases that expired (which slot came back by its TTL, and when):

# %%
story.expired(run.slot_leases)

# %% [markdown]
# ## Capital: open and permitted notional against `max_total_notional`

# %%
plots.capital(run)

# %%
plots.capital_symbols(run)

# %% [markdown]
# ## The violations of these invariants, explained
# `slots` (a release lost or doubled lets one OPEN too many through) and `capital`.

# %%
story.invariants(run).loc[["slots", "one_position_per_symbol", "capital"]]

# %%
display(Markdown(story.violations(run)))
