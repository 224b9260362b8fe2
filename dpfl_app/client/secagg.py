"""The ClientApp's secure-aggregation stages, over Flower's Message API.

Message types (flwr 1.42 routes "<category>.<action>" to the function
registered with `@app.<category>("<action>")`):

- `query.secagg_setup`, `query.secagg_share_keys`, `query.secagg_unmask`: the
  non-training stages. They import no torch: in deployment each message may
  start a fresh process, and these must stay cheap.
- `train.secagg`: training, wrapped as `masking_mod(zero_safe_adaptiveclipping_mod(train))`.
  Flower's mod clips w_local - w_global to C_t and sets the norm bit; this mod
  then encodes the clipped delta and the bit b_i, masks them, and replies with
  the masked vector only (no metrics: a loss or a bit in the clear would leak).

The protocol itself is `dpfl_app.secagg.client`; its state lives in
`context.state` between messages. A refusal is an error reply, which the
server records with its reason in the operator's diagnostics and counts as a
dropout.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from dpfl_app.client import policy as client_policy
from dpfl_app.secagg import CIPHERTEXTS, RECORD, ROUND, SRC, client, quantize

STATE_KEY = "secagg"  # this node's protocol state in context.state
REFUSED = 4030  # Error.code of a refusal


def _state(context: Context) -> dict:
    record = context.state.config_records.get(STATE_KEY)
    return dict(record) if record is not None else {}


def _save(context: Context, state: dict) -> None:
    context.state[STATE_KEY] = ConfigRecord(state)


def refuse(msg: Message, reason: str) -> Message:
    """Log the refusal on this node and reply with an error the server counts as a dropout."""
    log(WARNING, "refused %s: %s", msg.metadata.message_type, reason)
    return Message(Error(code=REFUSED, reason=reason), reply_to=msg)


def _reply(msg: Message, reply: dict) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord(reply)}), reply_to=msg)


def setup(msg: Message, context: Context) -> Message:
    """Stage 1, after the node's privacy policy accepts the announced mechanism."""
    request = dict(msg.content[RECORD])
    reason = client_policy.refusal(request, dict(context.node_config))
    if reason is not None:
        return refuse(msg, reason)
    try:
        state, reply = client.setup(request)
    except client.SecAggRefusal as refusal:
        return refuse(msg, str(refusal))
    _save(context, state)
    return _reply(msg, reply)


def _stage(step, msg: Message, context: Context) -> Message:
    """Run one protocol step on the stored state; save the new state, or refuse."""
    try:
        state, reply = step(_state(context), dict(msg.content[RECORD]))
    except client.SecAggRefusal as refusal:
        return refuse(msg, str(refusal))
    _save(context, state)
    return _reply(msg, reply)


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: shares of the self-mask seed and masking key, encrypted per neighbour."""
    return _stage(client.share_keys, msg, context)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4: the shares the server needs; never both kinds for one client."""
    return _stage(client.unmask, msg, context)


def clipped_delta(sent: ArrayRecord, trained: ArrayRecord) -> np.ndarray:
    """w_local - w_global, flattened in the ArrayRecord's order, in float64."""
    return np.concatenate([
        (np.asarray(trained[name].numpy(), dtype=np.float64)
         - np.asarray(sent[name].numpy(), dtype=np.float64)).ravel()
        for name in sent.keys()])


def masking_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Stage 3: take the neighbours' shares, train (clipped by the inner mod), mask, reply."""
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
    encoded = quantize.encode_update(clipped_delta(msg.content["arrays"], trained),
                                     1 - int(metrics[KEY_NORM_BIT]), clip,
                                     np.random.default_rng())
    state, vector = client.masked_input(state, encoded)
    _save(context, state)
    return Message(RecordDict({RECORD: ArrayRecord({"masked": Array(vector)})}), reply_to=msg)


def policy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a train message whose announced mechanism this node's policy rejects."""
    reason = client_policy.refusal(dict(msg.content["config"]), dict(context.node_config))
    return refuse(msg, reason) if reason is not None else call_next(msg, context)
