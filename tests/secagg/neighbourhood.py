"""A client's neighbourhood with committed, signed round keys, for share-keys requests."""

from __future__ import annotations

from functools import lru_cache

from dpfl_app.secagg import inprocess, round_keys
from dpfl_app.secagg.identity import Identity

SESSION = inprocess.SESSION
LAST_ROUND = 6  # every identity here commits keys for rounds 0..LAST_ROUND


@lru_cache(maxsize=None)
def identity(j: int) -> Identity:
    return inprocess.relayed_identities(1)[1]


@lru_cache(maxsize=None)
def enrolment(j: int, session: int = SESSION) -> tuple[dict, dict]:
    """(state, reply) of identity j's enrolment for rounds 0..LAST_ROUND of `session`."""
    return round_keys.enrol({}, {"round": 0, "session": session, "dp-rounds": LAST_ROUND},
                            identity(j))


def keys(j: int, round_id: int, session: int = SESSION) -> dict:
    """Identity j's committed keys for `round_id`, as `ServerRound.add_keys` takes them."""
    directory = round_keys.Directory()
    directory.receive(j, enrolment(j, session)[1])
    return directory.round_keys(j, round_id)


def request(index: int, neighbours: list[int], threshold: int, round_id: int = 1,
            session: int = SESSION, **announced) -> dict:
    """The share-keys request an honest server sends client `index` (identity `index`)."""
    peer_keys = [keys(j, round_id, session) for j in neighbours]
    return {"round": round_id, "index": index, "indices": list(neighbours),
            "threshold": threshold, "session": session,
            "c_pks": [k["c_pk"] for k in peer_keys], "s_pks": [k["s_pk"] for k in peer_keys],
            "names": [k["name"] for k in peer_keys], "id_pks": [k["id_pk"] for k in peer_keys],
            "signatures": [k["sig"] for k in peer_keys], **announced}
