"""Privacy math, pure: no Flower imports, and nothing else of dpfl_app's.

`mechanism` is what the server does each round (DP-FedAvg with adaptive
clipping, Andrew et al. 2021); `accounting` turns what ran into (epsilon, delta);
`audit` estimates epsilon back from one run with canary clients (Andrew et al. 2024).
`skellam`, `distributed` and `distributed_accounting` are distributed DP's noise,
parameters and accounting (noise-at=clients: Skellam shares under secure aggregation).
"""

# Here, not in accounting.py, so that validating a run config (config.py, also in
# every ClientApp process) does not import dp_accounting and scipy (~1 s).
SAMPLING_MODES = ("poisson", "fixed")
