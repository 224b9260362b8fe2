"""A client whose update is exactly zero trains normally: norm 0 is unclipped."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import adaptiveclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from dpfl_app.client_app import app as client_app
from dpfl_app.client.mods import user_level_clipping_mod, zero_safe_adaptiveclipping_mod
from dpfl_app.config import model_spec, validate
from dpfl_app.task import build_model
from tests.inprocess import default_run_config


def _train_message(arrays: ArrayRecord, clip: float = 0.1) -> Message:
    config = ConfigRecord({KEY_CLIPPING_NORM: clip, "server-round": 1})
    msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1,
                  message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink would
    return msg


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 10},
                   state=RecordDict(), run_config=run_config)


def _unchanged_reply(msg: Message, ctxt: Context) -> Message:
    """A train function whose update is exactly zero: it sends back what it got."""
    content = RecordDict({"arrays": msg.content["arrays"],
                          "metrics": MetricRecord({"num-examples": 0})})
    return Message(content=content, reply_to=msg)


def _arrays() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.array([0.5, -1.0], dtype=np.float32)),
                        "b": Array(np.zeros(3))})


def test_flower_mod_fails_on_a_zero_update():
    """The bug this module works around (flwr 1.42)."""
    with pytest.raises(ZeroDivisionError):
        adaptiveclipping_mod(_train_message(_arrays()), _context({}), _unchanged_reply)


def test_zero_update_goes_through_unclipped():
    sent = _arrays()
    reply = zero_safe_adaptiveclipping_mod(_train_message(sent), _context({}), _unchanged_reply)
    assert not reply.has_error()
    assert reply.content["metrics"][KEY_NORM_BIT] == 0  # Flower's bit: 1 = clipped
    for key in sent:
        np.testing.assert_array_equal(reply.content["arrays"][key].numpy(), sent[key].numpy())


def test_nonzero_update_is_still_clipped_by_flower():
    def far_reply(msg, ctxt):
        arrays = ArrayRecord({k: Array(v.numpy() + 10.0)
                              for k, v in msg.content["arrays"].items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"n": 1})}),
                       reply_to=msg)

    sent = _arrays()
    reply = zero_safe_adaptiveclipping_mod(_train_message(sent, clip=0.1), _context({}), far_reply)
    assert reply.content["metrics"][KEY_NORM_BIT] == 1
    delta = [reply.content["arrays"][k].numpy() - sent[k].numpy() for k in sent]
    assert np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in delta)) == \
        pytest.approx(0.1, rel=1e-5)


def test_the_per_client_clipping_line_never_reaches_the_log(caplog):
    """In a simulation the ClientApps share the run's log: one line per trained
    client would count the cohort. Flower's mod still runs; its line is dropped."""
    def far_reply(msg, ctxt):
        arrays = ArrayRecord({k: Array(v.numpy() + 10.0)
                              for k, v in msg.content["arrays"].items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"n": 1})}),
                       reply_to=msg)

    caplog.set_level("DEBUG")
    for _ in range(3):
        reply = zero_safe_adaptiveclipping_mod(_train_message(_arrays()), _context({}),
                                               far_reply)
        assert reply.content["metrics"][KEY_NORM_BIT] == 1  # the mod did clip
    assert not [r for r in caplog.records if "clipped by value" in r.getMessage()]
    caplog.clear()
    logging.getLogger("flwr").info("another flwr line")  # the filter drops only that line
    assert [r.getMessage() for r in caplog.records] == ["another flwr line"]


def test_real_client_app_with_a_vanishing_learning_rate_replies_normally():
    """lr = 1e-300 underflows to a zero step: the whole ClientApp, mod included."""
    cfg = default_run_config(lr=1e-300)
    validate(dict(cfg))
    torch.manual_seed(0)
    sent = ArrayRecord(build_model(*model_spec(validate(dict(cfg)))).state_dict())
    reply = client_app(_train_message(sent), _context(cfg))
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"][KEY_NORM_BIT] == 0
    for key in sent:
        np.testing.assert_array_equal(reply.content["arrays"][key].numpy(), sent[key].numpy())


def test_a_record_only_site_sends_its_update_unclipped():
    """Record-level DP alone: the ClientApp's DP-SGD update leaves without the user-level clip
    (and without a norm bit), even if a message carries a clip norm; before, it was clipped."""
    cfg = default_run_config(**{"noise": 0.0, "record-noise": 1.0, "local-epochs": 1})
    torch.manual_seed(0)
    sent = ArrayRecord(build_model(*model_spec(validate(dict(cfg)))).state_dict())
    reply = client_app(_train_message(sent, clip=1e-3), _context(cfg))
    assert not reply.has_error(), reply.error
    assert KEY_NORM_BIT not in reply.content["metrics"]
    delta = [reply.content["arrays"][k].numpy() - sent[k].numpy() for k in sent]
    assert np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in delta)) > 0.1


def test_secure_aggregation_keeps_the_clip_of_a_record_only_site():
    """Under secure aggregation C_t is the quantization range: the mod still clips."""
    def far_reply(msg, ctxt):
        arrays = ArrayRecord({k: Array(v.numpy() + 10.0) for k, v in msg.content["arrays"].items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"n": 1})}),
                       reply_to=msg)

    cfg = default_run_config(**{"noise": 0.0, "record-noise": 1.0, "secure-aggregation": True})
    reply = user_level_clipping_mod(_train_message(_arrays(), clip=0.1), _context(cfg), far_reply)
    assert reply.content["metrics"][KEY_NORM_BIT] == 1
