"""A client's own participation record: DP-FTRL's bound, enforced by the party it protects.

Under `mechanism = "dp-ftrl"` the server's epsilon assumes every client takes
part at most once every b rounds (at most k = ceil(T/b) times in the
announced T rounds). The server promises to ask no client sooner, but the
client does not have to believe it: this mod keeps, in the node's
`context.state`, the last round this node accepted, and refuses (an error
reply, counted as a dropout) any train request

- whose round comes less than b rounds after that one, or is not later at all;
- whose round exceeds the announced T, or that announces no b or T;
- whose announced b is below the node's own floor, node-config `min-separation`.

The participation is recorded *before* training, so a request that fails
later still counts. Messages of dp-fedavg runs pass untouched. No torch.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from dpfl_app.client.secagg import refuse

STATE_KEY = "dp-ftrl-participation"
ROUND_KEY = "server-round"  # set by Flower's FedAvg in every train message's config


def refusal(config: dict[str, Any], last_round: int | None,
            node_config: dict[str, Any]) -> str | None:
    """Why this node refuses the requested round, or None to take part."""
    try:
        b, rounds, now = (int(config["dp-min-separation"]), int(config["dp-rounds"]),
                          int(config[ROUND_KEY]))
    except (KeyError, TypeError, ValueError):
        return ("participation: a dp-ftrl request must announce dp-min-separation, dp-rounds "
                f"and {ROUND_KEY}")
    floor = int(node_config.get("min-separation", 1) or 1)
    if b < max(floor, 1):
        return (f"participation: the announced min-separation {b} is below this node's "
                f"node-config min-separation={floor}")
    if not 1 <= now <= rounds:
        return f"participation: round {now} is outside the announced 1..{rounds}"
    if last_round is not None and now - last_round < b:
        return (f"participation: asked for round {now}, but this node took part in round "
                f"{last_round}; min-separation {b} allows round {last_round + b} at the earliest")
    return None


def last_round(context: Context) -> int | None:
    record = context.state.config_records.get(STATE_KEY)
    return None if record is None else int(record["last-round"])


def min_separation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a dp-ftrl train request that breaks min-separation; else record it and train."""
    config = dict(msg.content["config"])
    if config.get("dp-mechanism") != "dp-ftrl":
        return call_next(msg, context)
    reason = refusal(config, last_round(context), dict(context.node_config))
    if reason is not None:
        return refuse(msg, reason)
    context.state[STATE_KEY] = ConfigRecord({"last-round": int(config[ROUND_KEY])})
    return call_next(msg, context)
