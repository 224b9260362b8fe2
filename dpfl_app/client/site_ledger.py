"""A site's own record-level privacy ledger and budget, kept in its node state.

With record-level DP each site adds the DP-SGD noise itself, so its guarantee
depends on nothing the server announces: only on the noise multiplier, the
sampling rate and the steps it applied, and on how many rounds it trained.
This module is that site's bookkeeping (`record_budget_mod`, on every train
message, before any training):

- it works out the noise multiplier the site applies: `record-noise`, or the
  one it calibrates itself for `target-record-epsilon` after `rounds` (cached
  in node state, so a fresh ClientApp process does not calibrate again);
- with node-config `max-record-epsilon` > 0 it refuses (an error reply the
  server counts as a dropout, as `max-epsilon` does) when the run's plan
  exceeds it, or when one more round would take its own ledger past it;
- it charges the round in its ledger (context.state, record "record-ledger")
  before training, and logs its own epsilon on its own node.

Flower keeps `context.state` per run: each run starts a fresh ledger. Imports
no torch (only dp-accounting, on nodes with record-level DP on).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from dpfl_app.client.node_log import node_log
from dpfl_app.config import record_level_on, validate

LEDGER_KEY = "record-ledger"
CALIBRATION_KEY = "record-calibration"
NODE_BUDGET_KEY = "max-record-epsilon"


def planned_model(cfg: dict, calibrated: float | None = None):
    """The RecordLevelModel of run config `cfg` (None when off): `record-noise`, or the
    sigma calibrated for `target-record-epsilon` after `rounds` (`calibrated` if known)."""
    if not record_level_on(cfg):
        return None
    from dpfl_app.privacy.record_level import RecordLevelModel, calibrate_record_noise

    sigma = cfg["record-noise"]
    if cfg["target-record-epsilon"] > 0:
        sigma = calibrated if calibrated is not None else calibrate_record_noise(
            cfg["target-record-epsilon"], cfg["record-delta"], cfg["record-sampling-rate"],
            cfg["local-epochs"], cfg["rounds"])
    return RecordLevelModel(sigma, cfg["record-sampling-rate"], cfg["local-epochs"],
                            cfg["record-delta"])


def applied_model(cfg: dict, context: Context):
    """`planned_model`, its calibration cached in this node's state."""
    if cfg["target-record-epsilon"] <= 0:
        return planned_model(cfg)
    wanted = [cfg["target-record-epsilon"], cfg["record-delta"], cfg["record-sampling-rate"],
              float(cfg["local-epochs"]), float(cfg["rounds"])]
    cached = context.state.config_records.get(CALIBRATION_KEY)
    if cached is not None and list(cached["for"]) == wanted:
        return planned_model(cfg, float(cached["noise"]))
    model = planned_model(cfg)
    context.state[CALIBRATION_KEY] = ConfigRecord({"for": wanted, "noise": model.noise_multiplier})
    return model


def trained_models(context: Context) -> list:
    """One RecordLevelModel per round this site trained in this run (its ledger)."""
    from dpfl_app.privacy.record_level import RecordLevelModel

    record = context.state.config_records.get(LEDGER_KEY)
    if record is None:
        return []
    return [RecordLevelModel(float(s), float(q), int(e), float(record["delta"]))
            for s, q, e in zip(record["noise"], record["sampling-rate"], record["local-epochs"])]


def charge(context: Context, model, server_round: int) -> list:
    """Add one trained round to the ledger in node state; returns the ledger."""
    trained = trained_models(context) + [model]
    record = context.state.config_records.get(LEDGER_KEY)
    rounds = (list(record["rounds"]) if record is not None else []) + [int(server_round)]
    context.state[LEDGER_KEY] = ConfigRecord({
        "rounds": rounds, "noise": [m.noise_multiplier for m in trained],
        "sampling-rate": [m.sampling_rate for m in trained],
        "local-epochs": [m.local_epochs for m in trained], "delta": model.delta})
    return trained


def refusal(cfg: dict, model, trained: list, max_epsilon: float) -> str | None:
    """Why this site will not train one more round within `max_epsilon` (> 0), or None."""
    from dpfl_app.privacy.record_level import ledger_epsilon, record_epsilon

    if model is None:
        return (f"record-level budget: node-config {NODE_BUDGET_KEY}={max_epsilon:g}, but the "
                "run has record-level DP off (record-noise=0, target-record-epsilon=0): "
                "epsilon = inf")
    plan = record_epsilon(model, cfg["rounds"])
    if not plan <= max_epsilon:
        return (f"record-level budget: the plan (record-noise sigma={model.noise_multiplier:.4g}, "
                f"record-sampling-rate q={model.sampling_rate:g}, {model.steps_per_round} steps "
                f"per round, {cfg['rounds']} rounds, delta={model.delta:g}) gives record-level "
                f"epsilon={plan:.3f} > node-config {NODE_BUDGET_KEY}={max_epsilon:g}")
    after = ledger_epsilon(trained + [model], model.delta)
    if not after <= max_epsilon:
        return (f"record-level budget: this site has trained {len(trained)} round(s) (epsilon "
                f"{ledger_epsilon(trained, model.delta):.3f}); one more would give "
                f"{after:.3f} > node-config {NODE_BUDGET_KEY}={max_epsilon:g}: it stops training")
    return None


def record_budget_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Check the site's own record-level budget, charge the round, then train."""
    from dpfl_app.client.secagg import refuse  # pylint: disable=import-outside-toplevel

    cfg = validate(dict(context.run_config))
    max_epsilon = float(context.node_config.get(NODE_BUDGET_KEY, 0) or 0)
    model = applied_model(cfg, context)
    if model is None and max_epsilon <= 0:
        return call_next(msg, context)
    if max_epsilon > 0:
        reason = refusal(cfg, model, trained_models(context), max_epsilon)
        if reason is not None:
            return refuse(msg, reason)
    server_round = int(msg.content["config"].get("server-round", 0))
    trained = charge(context, model, server_round)
    from dpfl_app.privacy.record_level import ledger_epsilon

    node_log("record-level DP on this site: round %d is this site's training round %d; its "
        "own ledger gives record-level epsilon %.3f at delta %g (sigma=%.4g, q=%g)",
        server_round, len(trained), ledger_epsilon(trained, model.delta), model.delta,
        model.noise_multiplier, model.sampling_rate)
    return call_next(msg, context)
