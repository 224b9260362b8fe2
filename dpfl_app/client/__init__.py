"""The ClientApp's side, wired together by `client_app.py` (as strategy/ is the server's).

- `mods.py`: Flower's `adaptiveclipping_mod`, safe for an all-zero update, and the
  filter that drops its per-client log line (counted, it would give the cohort size);
- `policy.py`: a SuperNode's privacy policy (`max-epsilon`, `trust-sampling`,
  `require-secure-aggregation`), checked on every train message;
- `secagg.py`: the secure-aggregation stages over the Message API (the protocol
  itself is `dpfl_app.secagg`).

client/ never imports strategy/, run/ or tools/, and nothing here imports torch:
the secure-aggregation stages must start fast in a fresh ClientApp process.
"""
