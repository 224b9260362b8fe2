"""With client-eval off, clients train on all their data; on, they hold 20% back."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from dpfl_app.client_app import app as client_app
from dpfl_app.config import client_settings
from dpfl_app.data import datasets as data, partition_cache
from dpfl_app.data.node_data import client_data
from dpfl_app.data.registry import DATASETS
from dpfl_app.task import build_model
from tests.inprocess import default_run_config


@pytest.fixture(autouse=True)
def no_disk_cache(monkeypatch):
    monkeypatch.setenv(partition_cache.CACHE_ENV, "off")
    partition_cache.load_client_data.cache_clear()
    yield
    partition_cache.load_client_data.cache_clear()


def _context(pid: int, num: int, **run_config) -> Context:
    return Context(run_id=1, node_id=pid + 1,
                   node_config={"partition-id": pid, "num-partitions": num},
                   state=RecordDict(), run_config=default_run_config(**run_config))


def _partition_size(pid: int, num: int) -> int:
    partitioner, _ = data._partitioned("digits", "", "", "", "iid", num, 0.5, 42)
    return len(partitioner.load_partition(pid))


@pytest.mark.parametrize("num", [10, 700])  # ~144 images each; two-image users
def test_without_client_eval_every_example_trains(num):
    settings = client_settings(_context(3, num))
    assert settings.val_fraction == 0
    train, val = client_data(settings)
    assert len(train.labels) == _partition_size(3, num) and len(val.labels) == 0


def test_with_client_eval_a_fifth_is_held_back_for_it():
    settings = client_settings(_context(3, 10, **{"client-eval": True}))
    assert settings.val_fraction == data.CLIENT_VAL_FRACTION
    train, val = client_data(settings)
    size = _partition_size(3, 10)
    assert len(train.labels) + len(val.labels) == size
    assert len(val.labels) == pytest.approx(size * data.CLIENT_VAL_FRACTION, abs=1)


def test_the_client_app_trains_on_its_whole_partition():
    """What the ClientApp reports as num-examples is the partition, not 80% of it."""
    net = build_model(DATASETS["digits"].model)  # what the ClientApp builds for model=auto
    config = ConfigRecord({"server-round": 1, KEY_CLIPPING_NORM: 1.0})
    msg = Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "config": config}),
                  dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink would
    reply = client_app(msg, _context(0, 700))
    assert reply.content["metrics"]["num-examples"] == _partition_size(0, 700) >= 2


def test_the_disk_cache_keeps_the_two_splits_apart(tmp_path, monkeypatch):
    monkeypatch.setenv(partition_cache.CACHE_ENV, str(tmp_path))
    whole, _ = partition_cache.load_client_data("digits", 1, 10)
    held, val = partition_cache.load_client_data("digits", 1, 10, val_fraction=0.2)
    partition_cache.load_client_data.cache_clear()  # what a new process reads from disk
    again, _ = partition_cache.load_client_data("digits", 1, 10)
    assert len(list(tmp_path.glob("digits-*.pt"))) == 2
    assert len(whole.labels) == len(held.labels) + len(val.labels) > len(held.labels)
    assert torch.equal(again.labels, whole.labels)
