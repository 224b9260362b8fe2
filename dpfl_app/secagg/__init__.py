"""Secure aggregation (SecAgg+, Bell et al. CCS 2020; Bonawitz et al. CCS 2017): pure parts.

The protocol's arithmetic and bookkeeping, free of Flower messages and of torch:

- `quantize`: fixed point with stochastic rounding, so that ||Q(delta)|| <= C always;
- `masks`: mask expansion with AES-256-CTR keyed by the full 256-bit secret;
- `graph`: the cohort's neighbourhood graph and the Shamir threshold;
- `round_keys`: the enrolment: each client's signed round keys, committed in advance
  for a window of rounds, derived from a per-run secret;
- `client`: one client's stages of a round, as functions of (state, request) -> (state, reply);
- `server`: the server's bookkeeping: routing, which shares to ask for, the unmasked sum.

Import rule (tests/test_layout.py): this folder imports nothing of ours but
itself and `dpfl_app.errors`; it may import numpy, `cryptography` and Flower's
cryptographic primitives (`flwr.common.secure_aggregation.crypto`,
`flwr.supercore.primitives.asymmetric`), never strategy/, run/ or tools/.
The Flower adapters live in `dpfl_app/strategy/secure_aggregation.py` (server)
and `dpfl_app/client/secagg.py` (client).
"""

# Names on the wire, shared by the server's and the client's Flower adapters.
RECORD = "secagg"  # the record a stage message carries (ConfigRecord; ArrayRecord for the input)
ROUND, SRC, CIPHERTEXTS = "secagg-round", "secagg-src", "secagg-ciphertexts"  # train.secagg config
ROTATION_SEED = "dp-rotation-seed"  # noise-at=clients: the round's public seed, train config
