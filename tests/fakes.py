"""Fake replies and a fake Grid, to drive strategies without a SuperLink."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from dpfl_app.privacy import mechanism
from dpfl_app.privacy.accounting import AccountingModel, PrivacyLedger
from dpfl_app.strategy.dp_fedavg import DPFedAvgAdaptive


# Messages are stamped with the identity of the process's task; outside a real
# ServerApp process we give it one.
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class FakeGrid:
    """Just enough of `flwr.serverapp.Grid` for sampling: N connected nodes."""

    def __init__(self, num_nodes: int) -> None:
        self.nodes = list(range(1, num_nodes + 1))

    def get_node_ids(self):
        return list(self.nodes)


def _metadata(node_id: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                    reply_to_message_id="", group_id="1", created_at=time.time(),
                    ttl=60.0, message_type="train")


def records(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def reply(node_id: int, arrays: dict[str, np.ndarray], norm_bit=0, num_examples=1,
          metrics: dict | None = None) -> Message:
    """A training reply as `adaptiveclipping_mod` would send it."""
    metric_values = {"num-examples": num_examples, "norm_bit": norm_bit} if metrics is None else metrics
    content = RecordDict({"arrays": records(arrays), "metrics": MetricRecord(metric_values)})
    return Message(content=content, metadata=_metadata(node_id))


def error_reply(node_id: int, reason: str = "boom") -> Message:
    return Message(error=Error(code=0, reason=reason), metadata=_metadata(node_id))


def clipped_reply(node_id: int, global_arrays: dict, delta: dict, clip: float, **kw) -> Message:
    """What an honest client sends: w_t + clip(delta, C_t), bit 1 when clipped."""
    norm = mechanism.l2_norm(list(delta.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    arrays = {k: (global_arrays[k] + scale * delta[k]).astype(np.float32) for k in global_arrays}
    return reply(node_id, arrays, norm_bit=int(scale < 1), **kw)


def make_strategy(noise: float = 0.0, m: int = 4, population: int = 10, *,
                  sampling: str = "fixed", seed: int = 0, count_stddev=None,
                  **kwargs) -> DPFedAvgAdaptive:
    split = mechanism.split_noise(noise, m, count_stddev)
    ledger = PrivacyLedger(AccountingModel(sampling, noise, population, m, 1e-5))
    fedavg = FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
                    fraction_evaluate=0.0)  # as strategy.build.build_strategy
    noise_rng, sampling_rng = np.random.SeedSequence(seed).spawn(2)
    return DPFedAvgAdaptive(fedavg, split, m, ledger, np.random.default_rng(noise_rng),
                            sampling_rng=np.random.default_rng(sampling_rng),
                            sampling=sampling, **kwargs)


def set_source(msg: Message, node_id: int) -> Message:
    """Stamp a reply as coming from `node_id`, as the SuperLink does."""
    msg.metadata.__dict__["_src_node_id"] = node_id
    return msg


def run_round(strategy, global_arrays: dict, replies_fn, server_round: int = 1,
              grid: FakeGrid | None = None):
    """configure_train, then aggregate_train on the replies `replies_fn(clip)` builds.

    Replies are written with node ids 1, 2, ...; the k-th distinct one is sent
    as the k-th sampled node (in id order), so tests need not know the cohort.
    Ours are Flower messages from the cohort; Flower's own wrapper ignores ids.
    """
    grid = grid or FakeGrid(10)
    sent = strategy.configure_train(server_round, records(global_arrays), ConfigRecord(), grid)
    cohort = sorted(msg.metadata.dst_node_id for msg in sent)
    clip = strategy.clipping_norm if not hasattr(strategy, "_round_clip") else strategy._round_clip
    replies = replies_fn(clip)
    order = list(dict.fromkeys(msg.metadata.src_node_id for msg in replies))
    for msg in replies:
        rank = order.index(msg.metadata.src_node_id)
        if rank < len(cohort):
            set_source(msg, cohort[rank])
    return strategy.aggregate_train(server_round, replies)
