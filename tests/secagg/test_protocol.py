"""SecAgg+ end to end in one process: the sum, dropouts at every stage, refusals."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dpfl_app.privacy.mechanism import clip_to_norm
from dpfl_app.secagg import client, inprocess, quantize, round_keys
from dpfl_app.secagg.server import ServerRound

DIM, CLIP = 300, 0.5
SESSION = inprocess.SESSION


def _cohort(n, seed=0):
    rng = np.random.default_rng(seed)
    # Norms between 0.2 C and 3 C: some clipped, some not.
    deltas = [rng.normal(size=DIM) * rng.uniform(0.2, 3) * CLIP / np.sqrt(DIM) for _ in range(n)]
    clipped = [clip_to_norm([d], CLIP)[0] for d in deltas]
    bits = [int(np.linalg.norm(d) <= CLIP) for d in deltas]
    return clipped, bits, inprocess.encode_all(clipped, bits, CLIP, seed)


def _check_sum(outcome, clipped, bits):
    assert outcome.total is not None
    total, unclipped = quantize.decode_sum(outcome.total, CLIP)
    plain = sum(clipped[i - 1] for i in outcome.survivors)
    assert unclipped == sum(bits[i - 1] for i in outcome.survivors)
    assert np.linalg.norm(total - plain) <= quantize.sum_error_bound(
        len(outcome.survivors), DIM, CLIP)


@pytest.mark.parametrize("n,k", [(6, 0), (16, 8), (13, 6)])
def test_secure_sum_equals_plain_sum_within_the_quantization_bound(n, k):
    clipped, bits, encoded = _cohort(n)
    outcome = inprocess.run_round(encoded, neighbours=k)
    assert outcome.survivors == list(range(1, n + 1)) and not outcome.refusals
    _check_sum(outcome, clipped, bits)


def test_the_bound_is_tight_enough_to_catch_a_missing_client():
    clipped, bits, encoded = _cohort(6)
    total, _ = quantize.decode_sum(inprocess.run_round(encoded).total, CLIP)
    without_one = sum(clipped[1:])
    assert np.linalg.norm(total - without_one) > quantize.sum_error_bound(6, DIM, CLIP)


@pytest.mark.parametrize("stage", inprocess.STAGES)
@pytest.mark.parametrize("k", [0, 6])  # k = 6, t = 4: two lost neighbours leave 4
def test_dropouts_at_each_stage_give_exactly_the_survivors_sum(stage, k):
    clipped, bits, encoded = _cohort(10, seed=3)
    outcome = inprocess.run_round(encoded, neighbours=k, drop={stage: {2, 7}},
                                  rng=random.Random(5))
    # Dropping before the masked input removes the client from the sum; dropping
    # after it (at consistency or unmasking) keeps its input, recovered from the others'
    # shares.
    after_input = stage in ("consistency", "unmask")
    expected = [i for i in range(1, 11) if after_input or i not in (2, 7)]
    assert outcome.survivors == expected
    _check_sum(outcome, clipped, bits)


def test_dropouts_spread_over_all_stages():
    clipped, bits, encoded = _cohort(12, seed=4)
    drop = {"enrol": {1}, "share_keys": {5}, "masked_input": {9}, "consistency": {10},
            "unmask": {12}}
    outcome = inprocess.run_round(encoded, drop=drop)
    assert outcome.survivors == [2, 3, 4, 6, 7, 8, 10, 11, 12]
    _check_sum(outcome, clipped, bits)


@pytest.mark.parametrize("stage", ["enrol", "share_keys", "masked_input", "consistency",
                                   "unmask"])
def test_fewer_survivors_than_threshold_releases_nothing(stage):
    """Below the threshold the round releases no sum at all (the caller adds noise only)."""
    _, _, encoded = _cohort(6)
    # Full graph: k = 5, t = 3. Four of six vanish.
    outcome = inprocess.run_round(encoded, drop={stage: {1, 2, 3, 4}})
    assert outcome.total is None


def test_a_client_left_with_fewer_neighbours_than_threshold_refuses():
    _, _, encoded = _cohort(12, seed=3)
    # k = 6, t = 4: client 1's ring neighbours are 2, 3, 4 and 10, 11, 12; three vanish
    # before sharing keys.
    outcome = inprocess.run_round(encoded, neighbours=6, drop={"share_keys": {2, 3, 4}},
                                  rng=random.Random(5))
    assert outcome.refusals and all("fewer than threshold" in r for r in outcome.refusals.values())


def test_survivors_below_a_clients_neighbour_threshold_make_it_refuse_to_sign():
    """Bell et al.: a client aborts when fewer than t of its neighbours are alive."""
    _, _, encoded = _cohort(12, seed=3)
    outcome = inprocess.run_round(encoded, neighbours=6, drop={"masked_input": {2, 3, 4}},
                                  rng=random.Random(5))
    assert outcome.total is None or outcome.refusals
    assert any("neighbours survived, fewer than threshold" in r
               for r in outcome.refusals.values())


def test_a_single_survivor_is_never_released():
    _, _, encoded = _cohort(2)
    assert inprocess.run_round(encoded, drop={"masked_input": {1}}).total is None


def enrolled(n, round_id=1, rounds=1, ids=None):
    """n clients enrolled for rounds 1..`rounds`: (server round, client states, ids)."""
    server, states, directory = ServerRound(round_id, n, 0), {}, round_keys.Directory()
    ids = ids or inprocess.relayed_identities(n)
    for i in server.indices:
        states[i], reply = round_keys.enrol({}, {"round": 1, "session": SESSION,
                                                 "dp-rounds": rounds}, ids[i])
        directory.receive(i, reply)
        server.add_keys(i, directory.round_keys(i, round_id))
    return server, states, ids


def share_keys_request(server, i, **extra):
    n = len(server.indices)
    return {**server.share_keys_request(i), "dp-clients": n, "dp-sampling": "fixed",
            "session": SESSION, **extra}


def _run_stages(n, up_to_masking=True):
    """A server round driven through share keys (or the consistency round), returning
    (server, client states, ids)."""
    _, _, encoded = _cohort(n)
    server, states, ids = enrolled(n)
    for i in server.indices:
        states[i], reply = client.share_keys(states[i], share_keys_request(server, i), ids[i])
        server.receive_share_keys(i, reply)
    for i in server.indices if up_to_masking else []:
        states[i] = client.receive_shares(states[i], server.shares_for(i))
        states[i], vector = client.masked_input(states[i], encoded[i - 1])
        server.receive_input(i, vector)
    for i in server.indices if up_to_masking else []:
        states[i], reply = client.consistency(states[i], server.consistency_request(i), ids[i])
        server.receive_consistency(i, reply)
    return server, states, ids


def test_the_shares_asked_for_follow_the_signed_set_only():
    """The unmask request names no survivors: the client derives them from the set it
    signed, so the server cannot ask for both shares of one client."""
    server, states, _ = _run_stages(4)
    states[1], reply = client.unmask(states[1], server.unmask_request(1))
    assert reply["seed_src"] == [2, 3, 4] and reply["key_src"] == []


def test_a_second_unmask_request_is_refused():
    """Asking once for seed shares, then again (for key shares of the same client)."""
    server, states, _ = _run_stages(4)
    states[1], _ = client.unmask(states[1], server.unmask_request(1))
    with pytest.raises(client.SecAggRefusal, match="out of order"):
        client.unmask(states[1], server.unmask_request(1))


def test_the_server_never_asks_for_both_shares():
    server, _, _ = _run_stages(6, up_to_masking=False)
    for i in server.indices:
        if i != 3:
            server.receive_input(i, np.zeros(DIM + 1, dtype=np.uint64))
    for i in server.inputs:  # client 3 "dropped" before masking
        held = server.held_by(i)
        survivors = server.consistency_request(i)["survivors"]
        assert 3 in held and server.public_keys[3][1] not in survivors
        assert server.public_keys[i][1] in survivors


def test_a_client_refuses_a_minority_threshold():
    server, states, ids = enrolled(5)
    with pytest.raises(client.SecAggRefusal, match="majority"):
        client.share_keys(states[1], share_keys_request(server, 1, threshold=2), ids[1])


def test_tampered_share_ciphertext_is_rejected():
    server, states, _ = _run_stages(3, up_to_masking=False)
    request = server.shares_for(1)
    request["ciphertexts"][0] = request["ciphertexts"][0][:-2] + b"AA"
    with pytest.raises(client.SecAggRefusal, match="failed authentication"):
        client.receive_shares(states[1], request)
