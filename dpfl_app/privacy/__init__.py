"""Privacy math for dpfl_app, free of Flower imports.

`mechanism` is what the server does each round (DP-FedAvg with adaptive
clipping, Andrew et al. 2021); `accounting` turns what ran into (epsilon, delta).
"""
