"""The server's generators: ChaCha20 keyed from the OS, separate streams, never stored."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from randomgen import ChaCha

from dpfl_app.privacy import randomness


def test_randomgen_chacha_is_the_chacha20_keystream():
    """Known-answer check against OpenSSL's ChaCha20 (via `cryptography`), zero nonce."""
    key = 0x0123456789ABCDEF_FEDCBA9876543210_0F1E2D3C4B5A6978_8796A5B4C3D2E1F0
    ours = ChaCha(key=key, counter=0, rounds=randomness.CHACHA_ROUNDS).random_raw(40)
    cipher = Cipher(algorithms.ChaCha20(key.to_bytes(32, "little"), bytes(16)), mode=None)
    keystream = cipher.encryptor().update(bytes(8 * 40))
    assert ours.tobytes() == keystream


def test_secure_generators_are_chacha20_separate_and_unpredictable():
    first, second = randomness.secure_generators(), randomness.secure_generators()
    assert first.secret
    for gen in (first.sampling, first.noise):
        assert isinstance(gen.bit_generator, ChaCha)
        assert gen.bit_generator.state["state"]["rounds"] == 20
    draws = [g.integers(2**63, size=4).tolist()
             for g in (first.sampling, first.noise, second.sampling, second.noise)]
    assert len({tuple(d) for d in draws}) == 4  # four distinct keys (collision ~2^-252)


def test_seeded_generators_are_reproducible_separate_and_not_secret():
    a, b = randomness.seeded_generators(7), randomness.seeded_generators(7)
    assert not a.secret
    assert a.noise.normal(size=3).tolist() == b.noise.normal(size=3).tolist()
    assert a.sampling.random(3).tolist() == b.sampling.random(3).tolist()
    assert a.sampling.random(3).tolist() != a.noise.random(3).tolist()


def test_server_generators_secret_unless_seeded():
    assert randomness.server_generators(None).secret
    assert not randomness.server_generators(3).secret


@pytest.mark.parametrize("deterministic", [False, True])
def test_checkpoint_holds_generator_state_only_when_seeded(tmp_path, deterministic):
    """The real recorder's checkpoint: no state of a secret generator is ever written."""
    import torch

    from dpfl_app.run.recorder import RunRecorder
    from tests.fakes import make_strategy
    from tests.inprocess import default_run_config

    cfg = default_run_config(**{"deterministic-noise": deterministic})
    strategy = make_strategy(0.3, m=4, population=10, sampling="poisson")
    gens = randomness.server_generators(cfg["seed"] if deterministic else None)
    strategy.rng, strategy.sampling_rng = gens.noise, gens.sampling
    strategy.records.append({"round": 1})
    recorder = RunRecorder.__new__(RunRecorder)  # only what save_checkpoint reads
    recorder.cfg, recorder.run_dir, recorder.strategy = cfg, tmp_path, strategy
    recorder.model_state, recorder.initial = {}, {}
    recorder.save_checkpoint()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    if deterministic:
        assert saved["rng"]["noise"] == gens.noise.bit_generator.state
    else:
        assert saved["rng"] is None
        raw = (tmp_path / "checkpoint.pt").read_bytes()
        for gen in (gens.noise, gens.sampling):
            key_words = gen.bit_generator.state["state"]["keysetup"]
            assert key_words.tobytes() not in raw
