"""Where the server's randomness comes from (no Flower imports).

Two independent generators: one draws the cohorts, the other the DP noise, so
that nothing learned about one stream (a cohort is visible to the sampled
nodes) says anything about the other.

Real runs (`secure_generators`): each generator is numpy's `Generator` on
randomgen's `ChaCha` bit generator with 20 rounds, keyed with 256 bits from
the operating system's CSPRNG (`secrets`). Its output is the ChaCha20
keystream (Bernstein 2008; RFC 8439 with a zero nonce), checked against
OpenSSL's ChaCha20 in tests/privacy/test_randomness.py. ChaCha20 rather than
randomgen's AESCounter: it needs no AES-NI to be fast and constant-time, and
it is the stream cipher the Linux kernel's own CSPRNG uses. The key and the
generator state stay in memory: they are never logged, checkpointed or
written anywhere, so a resumed run draws a fresh key.

On top of the bit stream, `Generator.normal` uses a ziggurat sampler in
floating point. Its low-order bits are not exactly Gaussian; `mechanism`
therefore rounds every noised release to a grid far coarser than them
(see `mechanism.release_grid`).

Experiments (`seeded_generators`, `deterministic-noise=true`): two PCG64
streams spawned from the seed. Reproducible, hence no secret, hence no
privacy: the ledger reports epsilon = inf for such runs.
"""

from __future__ import annotations

import secrets
from typing import NamedTuple

import numpy as np
from randomgen import ChaCha

KEY_BITS = 256
CHACHA_ROUNDS = 20


class ServerGenerators(NamedTuple):
    """The cohort sampler's generator and the noise generator; `secret` says
    whether they are unpredictable (OS-keyed) or reproducible from a seed."""

    sampling: np.random.Generator
    noise: np.random.Generator
    secret: bool


def secure_generator() -> np.random.Generator:
    """A numpy Generator on ChaCha20 with a fresh 256-bit key from the OS."""
    bit_generator = ChaCha(key=secrets.randbits(KEY_BITS), counter=0, rounds=CHACHA_ROUNDS)
    return np.random.Generator(bit_generator)


def secure_generators() -> ServerGenerators:
    """Independent OS-keyed generators for sampling and noise (real runs)."""
    return ServerGenerators(secure_generator(), secure_generator(), secret=True)


def seeded_generators(seed: int) -> ServerGenerators:
    """Reproducible, independent PCG64 streams for sampling and noise (experiments only).

    PCG64's state is plain integers, so a checkpoint can hold it and a resumed
    deterministic run repeats the uninterrupted one exactly.
    """
    sampling, noise = np.random.SeedSequence(seed).spawn(2)
    return ServerGenerators(np.random.default_rng(sampling), np.random.default_rng(noise),
                            secret=False)


def server_generators(deterministic_seed: int | None) -> ServerGenerators:
    """Secure generators, or seeded ones when `deterministic_seed` is given."""
    if deterministic_seed is None:
        return secure_generators()
    return seeded_generators(deterministic_seed)
