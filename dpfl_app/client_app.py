"""dpfl_app ClientApp: local training, clipped by Flower's `adaptiveclipping_mod`.

The mod (through `client.mods.zero_safe_adaptiveclipping_mod`, which lets an
all-zero update through instead of dividing by its norm) is attached to
`train` only: on evaluate messages (which carry no clip norm) it would fail.
It clips w_local - w_global to the round's clip norm C_t and adds the
`norm_bit` metric; the server adds the noise.

With `secure-aggregation=true` the server drives SecAgg+ stages instead
(`dpfl_app.client.secagg`): `train.secagg` runs the same training inside the
same clipping mod, then masks. Every train message first passes the node's
privacy policy (`dpfl_app.client.policy`: a node that requires secure aggregation
refuses the plain `train` message whatever the server announces) and, under dp-ftrl, the node's own
participation record (`dpfl_app.client.participation`). With record-level DP on
(`record-noise` or `target-record-epsilon`), `site_ledger.record_budget_mod` checks and
charges the site's own ledger, and training is DP-SGD (`dpfl_app.client.dp_sgd`); with
record-level DP alone the update is not clipped at user level (`config.user_level_clip_on`;
secure aggregation keeps the clip as its quantization range). Torch,
the model and the data are
imported only where training or evaluation needs them, so that the
secure-aggregation stages start fast in a fresh process.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dpfl_app.client import secagg as secagg_client
from dpfl_app.client.secagg import masking_mod, plain_policy_mod, policy_mod
from dpfl_app.client.mods import user_level_clipping_mod, zero_safe_adaptiveclipping_mod
from dpfl_app.client.participation import min_separation_mod
from dpfl_app.run import console
from dpfl_app.client.site_ledger import record_budget_mod

app = ClientApp()


def _model_and_data(msg: Message, context: Context):
    from dpfl_app.config import client_settings  # pylint: disable=import-outside-toplevel
    from dpfl_app.data.node_data import client_data  # pylint: disable=import-outside-toplevel
    from dpfl_app.task import build_model  # pylint: disable=import-outside-toplevel

    console.configure(context.run_config)  # this process's Flower lines: verbose=true or not
    settings = client_settings(context)
    net = build_model(settings.model, settings.num_classes)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    train_set, val_set = client_data(settings)
    return settings, net, train_set, val_set


@app.train(mods=[plain_policy_mod, min_separation_mod, record_budget_mod,
                  user_level_clipping_mod])
def train_fn(msg: Message, context: Context) -> Message:
    """Train the global model on this client's data and reply with the new weights."""
    from dpfl_app.data.datasets import loader  # pylint: disable=import-outside-toplevel
    from dpfl_app.task import train  # pylint: disable=import-outside-toplevel

    settings, net, train_set, _ = _model_and_data(msg, context)
    if record_dp_sgd(net, train_set, settings, context):
        # Only the model, a function of noised sums: no loss or count of the site's records.
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord()})
        return Message(content=content, reply_to=msg)
    round_seed = settings.seed + 1000 * int(msg.content["config"].get("server-round", 0))
    train_loss = train(
        net, loader(train_set, settings.batch_size, shuffle=True, seed=round_seed),
        settings.local_epochs, settings.lr,
    )
    metrics = MetricRecord({"train-loss": train_loss, "num-examples": len(train_set.labels)})
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


# Secure aggregation: the same training, clipped by the same mod, then masked.
app.train("secagg", mods=[policy_mod, record_budget_mod, masking_mod,
                         zero_safe_adaptiveclipping_mod])(train_fn)
app.query("secagg_enrol")(secagg_client.enrol)
app.query("secagg_share_keys")(secagg_client.share_keys)
app.query("secagg_consistency")(secagg_client.consistency)
app.query("secagg_unmask")(secagg_client.unmask)


def record_dp_sgd(net, train_set, settings, context: Context) -> bool:
    """Record-level DP-SGD (dpfl_app.client.dp_sgd) when the run asks for it; False when it does not."""
    from dpfl_app.config import validate  # pylint: disable=import-outside-toplevel
    from dpfl_app.client.site_ledger import applied_model  # pylint: disable=import-outside-toplevel

    cfg = validate(dict(context.run_config))
    model = applied_model(cfg, context)  # what record_budget_mod charged
    if model is None:
        return False
    from dpfl_app.client.dp_sgd import DpSgdSettings, train_dp_sgd  # pylint: disable=import-outside-toplevel
    from dpfl_app.privacy.randomness import secure_generator  # pylint: disable=import-outside-toplevel

    train_dp_sgd(net, train_set, DpSgdSettings(
        model.noise_multiplier, cfg["record-clip"], model.sampling_rate, settings.local_epochs,
        settings.lr, settings.batch_size), secure_generator())
    return True


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this client's validation split (not DP-covered)."""
    from dpfl_app.data.datasets import loader  # pylint: disable=import-outside-toplevel
    from dpfl_app.task import test  # pylint: disable=import-outside-toplevel

    settings, net, _, val_set = _model_and_data(msg, context)
    loss, accuracy = test(net, loader(val_set, 256, shuffle=False))
    metrics = MetricRecord(
        {"eval-loss": loss, "eval-acc": accuracy, "num-examples": len(val_set.labels)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
