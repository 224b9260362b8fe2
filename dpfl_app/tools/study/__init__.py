"""The study engine: many DP-FedAvg runs on one machine, fast (`dpfl sweep --engine inprocess`).

`engine.py` runs the app's own mechanism, sampling and accounting round by
round; `vectorised.py` trains a whole cohort at once with `torch.func`.
"""
