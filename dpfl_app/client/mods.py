"""Client-side mods: Flower's `adaptiveclipping_mod`, safe for an all-zero update.

Flower's mod (flwr 1.42, `adaptive_clip_inputs_inplace`) divides the clip norm
by the update's norm, so a client whose update is exactly zero (an empty
partition, lr=0, a model already at a fixed point) raises ZeroDivisionError and
its reply becomes a failed one. A zero update needs no clipping: its norm 0 is
within any clip norm, so it is sent unchanged with the bit "not clipped".

Kept on the client side, next to the ClientApp, because it wraps the client
mod; the server's strategy never sees a difference.

Flower's mod also logs one line per call ("adaptiveclipping_mod: ndarrays are
clipped by value"). In a simulation every ClientApp writes into the run's log,
so counting those lines per round counts the sampled clients: an exact,
un-noised participation count in a file users share. This module drops that
one line from Flower's logger; the clip norm it shows is in the round line.

`user_level_clipping_mod` runs that clip only where the run has one
(`config.user_level_clip_on`): with record-level DP alone the site's update
leaves unclipped, as the server expects it.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from dpfl_app.config import user_level_clip_on, validate

MOD_LINE = "adaptiveclipping_mod:"  # how Flower's per-call line starts (flwr 1.42)


class DropPerClientModLine(logging.Filter):
    """Drops Flower's per-client clipping line: its count is the cohort size."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(MOD_LINE)


_FLOWER_LOGGER = logging.getLogger("flwr")
if not any(isinstance(f, DropPerClientModLine) for f in _FLOWER_LOGGER.filters):
    _FLOWER_LOGGER.addFilter(DropPerClientModLine())


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


def user_level_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """`zero_safe_adaptiveclipping_mod` when the run clips at user level; otherwise the
    update goes out as trained (record-level DP alone: no clip, no norm bit)."""
    if user_level_clip_on(validate(dict(ctxt.run_config))):
        return zero_safe_adaptiveclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)
