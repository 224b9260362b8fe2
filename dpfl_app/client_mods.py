"""Client-side mods: Flower's `adaptiveclipping_mod`, safe for an all-zero update.

Flower's mod (flwr 1.42, `adaptive_clip_inputs_inplace`) divides the clip norm
by the update's norm, so a client whose update is exactly zero (an empty
partition, lr=0, a model already at a fixed point) raises ZeroDivisionError and
its reply becomes a failed one. A zero update needs no clipping: its norm 0 is
within any clip norm, so it is sent unchanged with the bit "not clipped".

Kept on the client side, next to the ClientApp, because it wraps the client
mod; the server's strategy never sees a difference.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_NORM_BIT


def _single_arrays(msg: Message) -> list[np.ndarray]:
    return next(iter(msg.content.array_records.values())).to_numpy_ndarrays()


def zero_safe_adaptiveclipping_mod(msg: Message, ctxt: Context,
                                   call_next: ClientAppCallable) -> Message:
    """Flower's `adaptiveclipping_mod`, except that an exactly-zero update is
    returned unchanged with norm bit 0 (unclipped) instead of failing."""
    replies: list[Message] = []

    def train_and_keep(inner_msg: Message, inner_ctxt: Context) -> Message:
        reply = call_next(inner_msg, inner_ctxt)
        replies.append(reply)
        return reply

    try:
        return adaptiveclipping_mod(msg, ctxt, train_and_keep)
    except ZeroDivisionError:
        # Only the clip step can get here with a reply: training itself finished.
        if not replies or any(np.any(new != old) for new, old in
                              zip(_single_arrays(replies[0]), _single_arrays(msg))):
            raise
        reply = replies[0]
        metrics = next(iter(reply.content.metric_records.values()))
        metrics[KEY_NORM_BIT] = 0  # Flower's bit means "clipped"; a norm of 0 never is
        return reply
