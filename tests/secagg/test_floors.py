"""A client's own floors: neighbourhood, threshold and survivors follow from the announced
cohort; one share-keys request (the round's first message) per round; no round past the
announced T."""

from __future__ import annotations

import pytest

from dpfl_app.secagg import client, floors
from tests.secagg import neighbourhood

ME = neighbourhood.identity(1)


def _setup(neighbours, threshold, state=None, round=1, session=neighbourhood.SESSION,
           **announced):
    """Client 1's share-keys request (the round's first message) and its answer."""
    request = neighbourhood.request(1, neighbours, threshold, round, session,
                                    **{"dp-clients": 1000, "dp-sampling": "poisson",
                                       "dp-population": 10**6, **announced})
    return client.share_keys(state or neighbourhood.enrolment(1, session)[0], request, ME)


@pytest.mark.parametrize("m,floor", [(3, 2), (6, 3), (20, 10), (32, 16), (1000, 16)])
def test_the_neighbour_floor_follows_the_announced_cohort(m, floor):
    assert floors.neighbour_floor(m) == floor
    assert floors.min_cohort(m) == floor + 1


def test_one_neighbour_with_threshold_one_is_refused_when_a_thousand_are_announced():
    """The share would be the secret itself, and 1000 clients per round were announced."""
    with pytest.raises(client.SecAggRefusal, match="fewer than the floor 16"):
        _setup([2], 1)
    with pytest.raises(client.SecAggRefusal, match="fewer than the floor 16"):
        _setup(list(range(2, 12)), 6)  # ten neighbours: still below


def test_a_threshold_below_a_majority_is_refused_at_the_floor():
    peers = list(range(2, 18))  # k = 16: the floor; t must be at least 9
    with pytest.raises(client.SecAggRefusal, match="majority"):
        _setup(peers, 8)
    state, reply = _setup(peers, 9)
    assert state["threshold"] == 9 and len(reply["ciphertexts"]) == 16


def test_a_second_share_keys_request_for_the_same_round_is_refused():
    """The round's first message carries the replay rule: once per round, only forward."""
    peers = list(range(2, 18))
    state, _ = _setup(peers, 9)
    with pytest.raises(client.SecAggRefusal, match="second share-keys request for round 1"):
        _setup(peers, 9, state=state)
    with pytest.raises(client.SecAggRefusal, match="second share-keys"):  # nor an older round
        _setup(peers, 9, state=state, round=0)
    later, _ = _setup(peers, 9, state=state, round=2)
    assert later["round"] == 2


def test_a_round_past_the_announced_rounds_is_refused():
    with pytest.raises(client.SecAggRefusal, match="past the 5 rounds"):
        _setup(list(range(2, 18)), 9, round=6, **{"dp-rounds": 5})


def test_a_cohort_bigger_than_the_announced_fixed_size_m_is_refused():
    """With fixed-size sampling the cohort is at most m: a bigger neighbourhood means m
    (and with it the sampling rate, and epsilon) was understated."""
    with pytest.raises(client.SecAggRefusal, match="understated"):
        _setup(list(range(2, 8)), 4, **{"dp-clients": 6, "dp-sampling": "fixed"})
    state, _ = _setup(list(range(2, 7)), 3, **{"dp-clients": 6, "dp-sampling": "fixed"})
    assert state["peers"] == [2, 3, 4, 5, 6]


def test_no_announced_cohort_is_refused():
    request = neighbourhood.request(1, [2, 3], 2)
    with pytest.raises(client.SecAggRefusal, match="did not announce dp-clients"):
        client.share_keys(neighbourhood.enrolment(1)[0], request, ME)


def test_a_poisson_cohort_far_above_the_announced_m_is_refused():
    """Binomial(N, m/N) exceeds floors.poisson_cohort_bound(m) with probability < 1e-9."""
    from scipy import stats

    m = 6
    bound = floors.poisson_cohort_bound(m)
    assert stats.binom.sf(bound - 1, 10**6, m / 10**6) < 1e-9
    with pytest.raises(client.SecAggRefusal, match="understated"):
        _setup(list(range(2, bound + 2)), bound // 2 + 1, **{"dp-clients": m})
    state, _ = _setup(list(range(2, bound + 1)), (bound - 1) // 2 + 1, **{"dp-clients": m})
    assert len(state["peers"]) == bound - 1


def test_a_run_id_above_two_to_the_63_signs_and_verifies():
    """Flower's run ids are unsigned 64-bit: every other run has one >= 2**63."""
    from dpfl_app.secagg.identity import Identity, round_keys_message

    message = round_keys_message(2**64 - 1, 1, ME.name, b"c", b"s")
    assert Identity.valid(ME.public, ME.sign(message), message)
    state, _ = _setup(list(range(2, 18)), 9, session=2**64 - 1)
    assert state["session"] == 2**64 - 1
