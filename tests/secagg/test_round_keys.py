"""Pre-committed round keys: enrolment once, then four exchanges a round.

The keys of every round are derived from a per-run secret, committed and signed in
advance under the client's identity name; they bind (run, round, name), never the
index the server assigns each round. Tests: a key moved to another round, run or
name is refused; a round without committed keys is refused; a dropout's rebuilt key
says nothing about its other rounds' keys; a server that remaps indices between
clients' views recovers nothing, and honest clients refuse.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from dpfl_app.secagg import client, inprocess, masks, round_keys, shamir
from dpfl_app.secagg.server import ServerRound
from tests.secagg import neighbourhood
from tests.secagg.test_malicious_server import (X, _honest_until_masking, _inputs, _pinned,
                                                _recover, show_views_and_unmask)

SESSION = neighbourhood.SESSION
PEERS = list(range(2, 7))  # k = 5 of an announced m = 6: the floor is 3, t = 3
FIXED = {"dp-clients": 6, "dp-sampling": "fixed"}


def _share_keys(request: dict, state: dict | None = None):
    return client.share_keys(state or neighbourhood.enrolment(1)[0], request,
                             neighbourhood.identity(1))


# --- derivation and enrolment ------------------------------------------------------------

def test_round_keys_are_fresh_per_run_round_and_kind_and_reproducible_from_the_secret():
    secret = bytes(range(32))
    keys = {(s, r, kind): round_keys.derive(secret, s, r, kind)
            for s in (1, 2) for r in (1, 2, 3) for kind in round_keys.KINDS}
    assert len(set(keys.values())) == len(keys)  # all distinct
    assert round_keys.derive(secret, 1, 2, b"s") == keys[1, 2, b"s"]  # a fresh process
    ident = neighbourhood.identity(1)
    request = {"round": 1, "session": SESSION, "dp-rounds": 3}
    state, reply = round_keys.enrol({}, request, ident)
    again, same = round_keys.enrol(state, request, ident)  # re-enrolment: the same keys
    assert same == reply and again["run-secret"] == state["run-secret"]
    assert reply["rounds"] == [1, 2, 3] and len(set(reply["s_pks"])) == 3
    other, _ = round_keys.enrol(state, {**request, "session": SESSION + 1}, ident)
    assert other["run-secret"] != state["run-secret"]  # a new run: a new secret


def test_one_enrolment_commits_at_most_a_window_of_rounds_and_none_past_t():
    assert round_keys.window(1, None) == list(range(1, round_keys.WINDOW + 1))
    assert round_keys.window(5, 7) == [5, 6, 7]
    assert round_keys.window(8, 7) == []


def test_a_key_committed_for_round_r_is_refused_in_another_round():
    """The server offers neighbour 2's round-1 keys (and signature) in round 2."""
    honest = neighbourhood.request(1, PEERS, 3, round_id=2, **FIXED)
    _share_keys(honest)  # the honest request passes
    replayed = dict(honest, **{key: list(honest[key]) for key in
                               ("c_pks", "s_pks", "signatures")})
    old = neighbourhood.keys(2, 1)
    replayed["c_pks"][0], replayed["s_pks"][0], replayed["signatures"][0] = \
        old["c_pk"], old["s_pk"], old["sig"]
    with pytest.raises(client.SecAggRefusal, match="not signed by its identity key for round 2"):
        _share_keys(replayed)


def test_a_key_offered_under_another_identity_name_or_run_is_refused():
    request = neighbourhood.request(1, PEERS, 3, **FIXED)
    swapped = dict(request, names=[request["names"][1], request["names"][0],
                                   *request["names"][2:]],
                   id_pks=[request["id_pks"][1], request["id_pks"][0], *request["id_pks"][2:]])
    with pytest.raises(client.SecAggRefusal, match="not signed by its identity key"):
        _share_keys(swapped)
    # Keys committed for another run, offered in this one (this client's run is SESSION).
    other_run = neighbourhood.request(1, PEERS, 3, session=SESSION + 1, **FIXED)
    with pytest.raises(client.SecAggRefusal, match="not signed by its identity key"):
        _share_keys({**other_run, "session": SESSION})


def test_a_round_without_committed_keys_is_refused():
    request = neighbourhood.request(1, PEERS, 3, **FIXED)
    with pytest.raises(client.SecAggRefusal, match="no keys for this run"):
        _share_keys(request, state={"round": 0})  # never enrolled
    state, _ = round_keys.enrol({}, {"round": 1, "session": SESSION, "dp-rounds": 2},
                                neighbourhood.identity(1))
    _share_keys(request, state=state)
    with pytest.raises(client.SecAggRefusal, match="committed no keys for round 3"):
        _share_keys(neighbourhood.request(1, PEERS, 3, round_id=3, **FIXED), state=state)
    with pytest.raises(client.SecAggRefusal, match="no keys for this run"):
        _share_keys({**request, "session": SESSION + 1}, state=state)


# --- the steady state --------------------------------------------------------------------

def _rounds(n: int, rounds: int, drop_by_round: dict[int, dict] | None = None):
    rng = np.random.default_rng(1)
    encoded = [rng.integers(0, 2**40, size=32, dtype=np.uint64) for _ in range(n)]
    identities = inprocess.relayed_identities(n)
    announced = {"dp-clients": n, "dp-sampling": "fixed", "dp-rounds": rounds}
    federation = inprocess.Federation()
    outcomes = [inprocess.run_round(encoded, neighbours=0, round_id=r, identities=identities,
                                    announced=announced, federation=federation,
                                    drop=(drop_by_round or {}).get(r))
                for r in range(1, rounds + 1)]
    return encoded, outcomes, federation


def test_after_round_one_no_round_enrols_and_every_sum_is_exact(monkeypatch):
    calls = []
    original = round_keys.enrol
    monkeypatch.setattr(round_keys, "enrol", lambda *a: calls.append(a[1]["round"]) or
                        original(*a))
    encoded, outcomes, _ = _rounds(6, 3)
    assert calls == [1] * 6  # six clients enrolled once, in round 1, for rounds 1-3
    for out in outcomes:
        assert not out.refusals and out.survivors == list(range(1, 7))
        expected = np.zeros(32, dtype=np.uint64)
        for vector in encoded:
            np.add(expected, vector, out=expected)
        assert np.array_equal(out.total, expected)


def test_a_dropouts_rebuilt_round_key_neither_equals_nor_derives_its_next_round_keys():
    """Client 3 vanishes after sharing keys in round 1: the server rebuilds its round-1
    masking key (as it must, to remove its pairwise masks); round 2's keys are another
    HKDF output of the secret, which that key does not determine."""
    _, (first, second), federation = _rounds(6, 2, {1: {"masked_input": {3}}})
    assert first.total is not None and 3 not in first.survivors
    assert second.total is not None and 3 in second.survivors  # back in round 2
    server = first.server
    rebuilt = shamir.combine(server.key_shares[3][: server.threshold])
    secret = federation.states[3]["run-secret"]
    c1, _, s1, _ = round_keys.key_pairs(secret, SESSION, 1)
    c2, c2_pk, s2, s2_pk = round_keys.key_pairs(secret, SESSION, 2)
    assert rebuilt == s1  # the right key was rebuilt ...
    assert rebuilt not in (c1, c2, s2)  # ... and it is no other key of this client
    # Nor does it derive round 2's keys in the way the secret does.
    guesses = {round_keys.derive(rebuilt, SESSION, 2, kind) for kind in round_keys.KINDS}
    assert not guesses & {c2, s2}
    # Round 2's public keys, as committed and used, are not those of the rebuilt key.
    public = masks.public_raw(X25519PrivateKey.from_private_bytes(rebuilt))
    assert public not in (c2_pk, s2_pk) and second.server.public_keys[3] == (c2_pk, s2_pk)


# --- index remapping ---------------------------------------------------------------------

def test_two_identities_at_one_index_or_one_identity_at_two_are_refused():
    request = neighbourhood.request(1, PEERS, 3, **FIXED)
    twice_index = dict(request, indices=[2, 2, 4, 5, 6])
    with pytest.raises(client.SecAggRefusal, match="malformed neighbourhood"):
        _share_keys(twice_index)
    own_index = dict(request, indices=[1, 3, 4, 5, 6])
    with pytest.raises(client.SecAggRefusal, match="malformed neighbourhood"):
        _share_keys(own_index)
    # One identity at two indices: its keys (and signature) repeated.
    twice_name = {key: (list(value) if isinstance(value, list) else value)
                  for key, value in request.items()}
    for key in ("c_pks", "s_pks", "names", "id_pks", "signatures"):
        twice_name[key][1] = twice_name[key][0]
    with pytest.raises(client.SecAggRefusal, match="not all distinct"):
        _share_keys(twice_name)


A, REMAPPED, HOLDERS = 2, 99, (4, 5)  # X's neighbour A, shown at index 99 to HOLDERS


class _Anything:
    """Equal to every label: a client whose routing check passes whatever the share says."""

    def __eq__(self, other) -> bool:
        return True

    __hash__ = object.__hash__


def _label(i: int, j: int) -> int:
    """The index client i is shown for client j."""
    return REMAPPED if i in HOLDERS and j == A else j


class Remap:
    """Shows A at index 99 to HOLDERS, relabelling what it routes to match each view."""

    def keys_request(self, i: int, request: dict) -> dict:
        return {**request, "indices": [_label(i, j) for j in request["indices"]]}

    def capture(self, i: int, reply: dict) -> dict:
        return {**reply, "dst": [A if d == REMAPPED else d for d in reply["dst"]]}

    def shares_request(self, i: int, request: dict) -> dict:
        return {**request, "src": [_label(i, j) for j in request["src"]]}


def _remapping_attack(routing_check: bool, monkeypatch):
    """X = 1, n = 6 (complete graph, t = 3). The server shows A, a neighbour of X, at
    index 99 to clients 4 and 5, and at its own index 2 to everyone else, relabelling the
    routed shares to match each view. It then shows 4 and 5 a survivor set without A
    (so that they hand over A's masking key) and the others the full set (so that they
    hand over X's seed): with both, X's input would come back."""
    if not routing_check:
        original = client.share_keys_plaintext_separate
        monkeypatch.setattr(client, "share_keys_plaintext_separate", lambda plaintext: (
            _Anything(), _Anything(), *original(plaintext)[2:]))
    n, ids, inputs = 6, _pinned(6), _inputs(6)
    server, states, refusals = ServerRound(1, n, 0, random.Random(3)), {}, {}
    _honest_until_masking(server, ids, inputs, states, refusals, liar=Remap())
    views = {i: sorted(set(server.indices) - {A}) if i in HOLDERS else server.indices
             for i in server.indices}
    seed_shares, key_shares = show_views_and_unmask(server, ids, states, refusals, views,
                                                    label=_label)
    recovered = None
    if X in server.inputs:
        recovered = _recover(server, seed_shares, key_shares, server.inputs[X])
    return recovered, seed_shares, refusals


def test_a_server_that_remaps_indices_between_views_recovers_nothing(monkeypatch):
    """The shares carry the (sender, receiver) indices as the sender saw them: A's share
    for 4 says 'from 2', which 4 knows as 99, and 4's share for A says 'to 99'. Both sides
    of every remapped pair refuse, and too few survive for anything to be unmasked."""
    recovered, _, refusals = _remapping_attack(True, monkeypatch)
    assert recovered is None
    assert {A, *HOLDERS} <= set(refusals)
    assert all("claims" in refusals[i] for i in (A, *HOLDERS)), refusals


def test_without_the_routing_check_the_signed_round_keys_still_stop_the_remap(monkeypatch):
    """With clients that accept any label, the remap gets through the masked input, but
    the survivor set is signed as round keys: a set without A's key is a different set,
    whatever index A has in 4's and 5's views, so 4 and 5 find too few neighbours that
    signed it and never hand over A's key, while X's seed alone unmasks nothing."""
    recovered, seed_shares, refusals = _remapping_attack(False, monkeypatch)
    assert recovered is None
    assert len(seed_shares.get(X, [])) >= 3  # the others did hand over X's seed
    assert set(HOLDERS) <= set(refusals)
    assert all("did not sign the survivor set" in refusals[i] for i in HOLDERS), refusals


def test_the_directory_keeps_one_node_per_name_and_ignores_malformed_enrolments():
    directory = round_keys.Directory()
    _, reply = neighbourhood.enrolment(2)
    directory.receive(10, reply)
    directory.receive(11, reply)  # another node claiming the same identity name
    directory.receive(12, {"id_name": "x"})  # malformed: no keys
    directory.receive(13, {**neighbourhood.enrolment(3)[1], "c_pks": []})  # columns differ
    assert directory.has(10, 1) and not any(directory.has(n, 1) for n in (11, 12, 13))
    directory.prune(3)
    assert not directory.has(10, 2) and directory.has(10, 3)
    directory.forget(10)
    assert not directory.has(10, 3)


def test_the_survivor_set_names_no_identity_only_round_keys():
    """A client learns its neighbours' names (to check their signatures), never who else
    survived: the signed survivor set is the survivors' masking keys of the round."""
    server = ServerRound(1, 20, 4, random.Random(0))
    for i in server.indices:
        server.add_keys(i, neighbourhood.keys(i, 1))
        server.shared.add(i)  # shared its keys
        server.receive_input(i, np.zeros(3, dtype=np.uint64))
    survivors = server.consistency_request(1)["survivors"]
    assert survivors == sorted(neighbourhood.keys(i, 1)["s_pk"] for i in server.indices)
    names = {neighbourhood.keys(i, 1)["name"].encode() for i in server.indices}
    assert not names & set(survivors)
    request = server.share_keys_request(1)
    assert len(request["names"]) == 4  # the names a client sees: its k neighbours'
