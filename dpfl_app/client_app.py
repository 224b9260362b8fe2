"""dpfl_app ClientApp: local training, clipped by Flower's `adaptiveclipping_mod`.

The mod (through `client_mods.zero_safe_adaptiveclipping_mod`, which lets an
all-zero update through instead of dividing by its norm) is attached to
`train` only: on evaluate messages (which carry no clip norm) it would fail.
It clips w_local - w_global to the round's clip norm C_t and adds the
`norm_bit` metric; the server adds the noise.

With `secure-aggregation=true` the server drives SecAgg+ stages instead
(`dpfl_app.secagg_client`): `train.secagg` runs the same training inside the
same clipping mod, then masks. Every train message first passes the node's
privacy policy (`dpfl_app.client_policy`); a node that requires secure
aggregation refuses the plain `train` message whatever the server announces. Torch, the model and the data are
imported only where training or evaluation needs them, so that the
secure-aggregation stages start fast in a fresh process.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dpfl_app import secagg_client
from dpfl_app.secagg_client import masking_mod, plain_policy_mod, policy_mod
from dpfl_app.client_mods import zero_safe_adaptiveclipping_mod

app = ClientApp()


def _model_and_data(msg: Message, context: Context):
    from dpfl_app.config import client_settings  # pylint: disable=import-outside-toplevel
    from dpfl_app.data.node_data import client_data  # pylint: disable=import-outside-toplevel
    from dpfl_app.task import build_model  # pylint: disable=import-outside-toplevel

    settings = client_settings(context)
    net = build_model(settings.model, settings.num_classes)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    train_set, val_set = client_data(settings)
    return settings, net, train_set, val_set


@app.train(mods=[plain_policy_mod, zero_safe_adaptiveclipping_mod])
def train_fn(msg: Message, context: Context) -> Message:
    """Train the global model on this client's data and reply with the new weights."""
    from dpfl_app.data.datasets import loader  # pylint: disable=import-outside-toplevel
    from dpfl_app.task import train  # pylint: disable=import-outside-toplevel

    settings, net, train_set, _ = _model_and_data(msg, context)
    round_seed = settings.seed + 1000 * int(msg.content["config"].get("server-round", 0))
    train_loss = train(
        net, loader(train_set, settings.batch_size, shuffle=True, seed=round_seed),
        settings.local_epochs, settings.lr,
    )
    metrics = MetricRecord({"train-loss": train_loss, "num-examples": len(train_set.labels)})
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


# Secure aggregation: the same training, clipped by the same mod, then masked.
app.train("secagg", mods=[policy_mod, masking_mod, zero_safe_adaptiveclipping_mod])(train_fn)
app.query("secagg_setup")(secagg_client.setup)
app.query("secagg_share_keys")(secagg_client.share_keys)
app.query("secagg_consistency")(secagg_client.consistency)
app.query("secagg_unmask")(secagg_client.unmask)


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
