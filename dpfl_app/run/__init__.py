"""A run's outputs: server-side evaluation, results files, checkpoints and plots.

Runs inside `flwr run` on the ServerApp. May import data/, privacy/ and
strategy/; never tools/.
"""
