"""Screening of training replies before anything of theirs reaches the model.

A reply with an error, the wrong arrays, non-finite values or a missing or
malformed norm bit is rejected. Because the server divides by the fixed
expected cohort size m, a rejected reply is accounted exactly like a client
that dropped out: the noise was calibrated to m, so privacy holds.

Each node may contribute at most one reply per round, and only if it was in
the cohort sent this round: a second reply, or one from a node outside the
cohort, would add a second clipped update and double the sensitivity. The
first reply from a cohort node is screened; any later one is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Message
from flwr.supercore.differential_privacy import KEY_NORM_BIT


@dataclass
class AcceptedReply:
    node_id: int
    arrays: list[np.ndarray]  # the client's clipped model w_t + clip(delta)
    unclipped: int  # Andrew et al.'s b_i: 1 when the update was *not* clipped


@dataclass
class RejectedReply:
    node_id: int
    reason: str


def _node(msg: Message) -> int:
    return msg.metadata.src_node_id


def screen_reply(msg: Message, reference: dict[str, np.ndarray],
                 norm_bit: bool = True) -> AcceptedReply | RejectedReply:
    """Accept `msg` only if it is exactly the model's arrays, finite, with a norm bit
    (none with `norm_bit=False`: a run without a user-level clip; `unclipped` is then 0)."""
    if msg.has_error():
        return RejectedReply(_node(msg), f"client error: {msg.error.reason}")
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return RejectedReply(
            _node(msg),
            f"expected 1 ArrayRecord and 1 MetricRecord, got "
            f"{len(content.array_records)} and {len(content.metric_records)}",
        )
    record = next(iter(content.array_records.values()))
    if list(record.keys()) != list(reference):
        return RejectedReply(_node(msg), "array names differ from the global model's")
    arrays = record.to_numpy_ndarrays()
    for (name, ref), arr in zip(reference.items(), arrays):
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            return RejectedReply(
                _node(msg),
                f"array {name!r} is {arr.dtype}{list(arr.shape)}, expected "
                f"{ref.dtype}{list(ref.shape)}",
            )
        if not np.all(np.isfinite(arr)):
            return RejectedReply(_node(msg), f"array {name!r} has NaN or inf values")
    if not norm_bit:
        return AcceptedReply(_node(msg), arrays, 0)
    metrics = next(iter(content.metric_records.values()))
    if KEY_NORM_BIT not in metrics:
        return RejectedReply(_node(msg), f"metric {KEY_NORM_BIT!r} is missing")
    clipped = metrics[KEY_NORM_BIT]
    if clipped not in (0, 1):
        return RejectedReply(_node(msg), f"metric {KEY_NORM_BIT!r}={clipped!r} is not 0 or 1")
    # Flower's mod sets norm_bit=1 when the update *was* clipped; invert it.
    return AcceptedReply(_node(msg), arrays, 1 - int(clipped))


def screen_replies(
    replies: list[Message], reference: dict[str, np.ndarray], cohort: set[int],
    norm_bit: bool = True,
) -> tuple[list[AcceptedReply], list[RejectedReply]]:
    """Split replies into accepted and rejected, keeping their order.

    At most one reply per node in `cohort` is screened; the rest are rejected.
    """
    accepted, rejected, seen = [], [], set()
    for msg in replies:
        node = _node(msg)
        if node not in cohort:
            result = RejectedReply(node, "node was not in this round's cohort")
        elif node in seen:
            result = RejectedReply(node, "duplicate: this node already replied this round")
        else:
            result = screen_reply(msg, reference, norm_bit)
        seen.add(node)
        (accepted if isinstance(result, AcceptedReply) else rejected).append(result)
    return accepted, rejected
