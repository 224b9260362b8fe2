"""The ClientApp's secure-aggregation stages, over Flower's Message API.

Message types (flwr 1.42 routes "<category>.<action>" to the function
registered with `@app.<category>("<action>")`):

- `query.secagg_enrol` (once per run: signed public keys for a window of
  rounds, `secagg.round_keys`), then per round `query.secagg_share_keys` (the
  round's first message: the announced mechanism passes the node's policy, the
  floors and the round are checked), `query.secagg_consistency`,
  `query.secagg_unmask`: the non-training stages. They import no torch: in
  deployment each message may start a fresh process, and these must stay cheap.
- `train.secagg`: training, wrapped as `masking_mod(zero_safe_adaptiveclipping_mod(train))`.
  Flower's mod clips w_local - w_global to C_t and sets the norm bit; this mod
  then encodes the clipped delta and the bit b_i, masks them, and replies with
  the masked vector only (no metrics: a loss or a bit in the clear would leak).
  With `noise-at=clients` the encoding is `client_noise.encode`: the rotated,
  scaled, rounded update plus this client's Skellam shares, modulo 2**b, masked
  in that ring, and sent packed, b bits a coordinate (`discrete.pack`).

The protocol itself is `dpfl_app.secagg.client`; its state lives in
`context.state` between messages. A refusal is an error reply, which the
server records with its reason in the operator's diagnostics and counts as a
dropout; the node's own log names the stage only (a reason can hold counts).

The node's identity (`dpfl_app.secagg.identity`): node-config
`secagg-identity-key` (its Ed25519 PEM private key) and `secagg-pinned-keys`
(the federation's pinned list) when set; otherwise a key generated on first
use and kept in `context.state`, which its neighbours learn through the server
(protection against an honest-but-curious server only).
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from dpfl_app.client import client_noise, policy as client_policy
from dpfl_app.secagg import CIPHERTEXTS, RECORD, ROUND, SRC, client, discrete, quantize, \
    round_keys
from dpfl_app.secagg.identity import (Identity, IdentityError, load_pinned_keys,
                                      load_private_key, private_bytes)

STATE_KEY = "secagg"  # this node's protocol state in context.state
IDENTITY_KEY = "secagg-identity"  # a relayed identity's private key, in context.state
REFUSED = 4030  # Error.code of a refusal


def identity(context: Context) -> Identity:
    """This node's identity: pinned by node-config, else generated once and relayed."""
    key_path = context.node_config.get("secagg-identity-key", "")
    pinned_path = context.node_config.get("secagg-pinned-keys", "")
    if key_path or pinned_path:
        if not (key_path and pinned_path):
            raise IdentityError("node-config secagg-identity-key and secagg-pinned-keys go "
                                "together: set both (or neither, for relayed keys)")
        return Identity(load_private_key(str(key_path)), load_pinned_keys(str(pinned_path)))
    stored = context.state.config_records.get(IDENTITY_KEY)
    if stored is None:
        key = Ed25519PrivateKey.generate()
        context.state[IDENTITY_KEY] = ConfigRecord({"key": private_bytes(key)})
    else:
        key = Ed25519PrivateKey.from_private_bytes(stored["key"])
    return Identity(key)


def _state(context: Context) -> dict:
    record = context.state.config_records.get(STATE_KEY)
    return dict(record) if record is not None else {}


def _save(context: Context, state: dict) -> None:
    context.state[STATE_KEY] = ConfigRecord(state)


def refuse(msg: Message, reason: str) -> Message:
    """Reply with an error the server counts as a dropout; log only that this node refused.

    The reason goes to the server (the operator's diagnostics), not to this log: in a
    simulation every node writes to one shared log, and reasons hold counts (neighbours,
    survivors) that are exact participation numbers.
    """
    log(WARNING, "refused a %s message (reason sent to the server)", msg.metadata.message_type)
    return Message(Error(code=REFUSED, reason=reason), reply_to=msg)


def _reply(msg: Message, reply: dict) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord(reply)}), reply_to=msg)


def _stage(step, msg: Message, context: Context, signed: bool = True) -> Message:
    """Run one protocol step on the stored state; save the new state, or refuse. The run
    id (`session`) is this node's own message's, never a value from the server's request."""
    request = {**dict(msg.content[RECORD]), "session": int(msg.metadata.run_id)}
    try:
        args = (identity(context),) if signed else ()
        state, reply = step(_state(context), request, *args)
    except (client.SecAggRefusal, IdentityError) as refusal:
        return refuse(msg, str(refusal))
    _save(context, state)
    return _reply(msg, reply)


def enrol(msg: Message, context: Context) -> Message:
    """Commit this node's signed public keys for a window of rounds of this run."""
    return _stage(round_keys.enrol, msg, context)


def share_keys(msg: Message, context: Context) -> Message:
    """A round's first message, after the node's privacy policy accepts the announced
    mechanism: check the round and the neighbours' signed keys; shares, encrypted per
    neighbour."""
    request = dict(msg.content[RECORD])
    reason = client_policy.refusal(request, dict(context.node_config))
    if reason is not None:
        return refuse(msg, reason)
    return _stage(client.share_keys, msg, context)


def consistency(msg: Message, context: Context) -> Message:
    """Sign the survivor set shown to this node (the survivors' round keys)."""
    return _stage(client.consistency, msg, context)


def unmask(msg: Message, context: Context) -> Message:
    """After t neighbours confirmed the same survivor set, the shares the server
    needs; never both kinds for one client."""
    return _stage(client.unmask, msg, context, signed=False)


def clipped_delta(sent: ArrayRecord, trained: ArrayRecord) -> np.ndarray:
    """w_local - w_global, flattened in the ArrayRecord's order, in float64."""
    return np.concatenate([
        (np.asarray(trained[name].numpy(), dtype=np.float64)
         - np.asarray(sent[name].numpy(), dtype=np.float64)).ravel()
        for name in sent.keys()])


def masking_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The masked input: take the neighbours' shares, train (clipped by the inner mod), mask, reply."""
    config = msg.content["config"]
    try:
        state = client.receive_shares(_state(context), {
            "round": config[ROUND], "src": list(config[SRC]),
            "ciphertexts": list(config[CIPHERTEXTS])})
    except client.SecAggRefusal as refusal:
        return refuse(msg, str(refusal))
    _save(context, state)
    out = call_next(msg, context)
    if out.has_error():
        return out
    trained = next(iter(out.content.array_records.values()))
    metrics = next(iter(out.content.metric_records.values()))
    clip = float(config[KEY_CLIPPING_NORM])
    # Flower's norm_bit is 1 when the update *was* clipped; b_i = 1 when it was not.
    delta, unclipped = clipped_delta(msg.content["arrays"], trained), 1 - int(metrics[KEY_NORM_BIT])
    bits = 64
    if client_noise.requested(config):  # distributed DP: noised integers modulo 2**b
        try:
            encoded, bits = client_noise.encode(dict(config), delta, unclipped, clip,
                                                int(config[ROUND]))
        except ValueError as error:
            return refuse(msg, f"noise-at=clients: {error}")
        # The survivors this client's consistency check requires: the announced t, and never
        # fewer than the share-keys request's (a server cannot lower it between the two).
        state["noise_threshold"] = max(int(state.get("noise_threshold", 0)),
                                       int(config["dp-noise-threshold"]))
        client_noise.log_own_bound(dict(config), context.state)
    else:
        encoded = quantize.encode_update(delta, unclipped, clip, np.random.default_rng())
    state, vector = client.masked_input(state, encoded, bits)
    if bits < 64:  # residues mod 2**b: b bits each on the wire, not a 64-bit word
        vector = discrete.pack(vector, bits)
    _save(context, state)
    return Message(RecordDict({RECORD: ArrayRecord({"masked": Array(vector)})}), reply_to=msg)


TRAINED_KEY = "trained-round"  # the last round this node accepted to train, in context.state


def policy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a train message whose announced mechanism this node's policy rejects.

    A node with a policy also refuses a second request for a round it trained, and a
    round past the announced number of rounds.
    """
    config, node_config = dict(msg.content["config"]), dict(context.node_config)
    reason = client_policy.refusal(config, node_config)
    if reason is None and client_policy.has_policy(node_config):
        record = context.state.config_records.get(TRAINED_KEY)
        reason = client_policy.round_refusal(config, None if record is None else
                                             int(record["round"]))
        if reason is None:
            context.state[TRAINED_KEY] = ConfigRecord(
                {"round": int(config.get("server-round", 0))})
    return refuse(msg, reason) if reason is not None else call_next(msg, context)


def plain_policy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The plain train message: refused outright by a node that requires secure aggregation."""
    reason = client_policy.plain_train_refusal(dict(context.node_config))
    return refuse(msg, reason) if reason is not None else policy_mod(msg, context, call_next)
