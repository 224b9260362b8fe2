"""A site's own record-level ledger and budget (dpfl_app/client/site_ledger.py), driven message by message."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from dpfl_app.config import validate
from dpfl_app.privacy.record_level import RecordLevelModel, record_epsilon
from dpfl_app.client.site_ledger import LEDGER_KEY, record_budget_mod, trained_models
from tests.inprocess import default_run_config

RECORD = {"noise": 0.0, "record-noise": 1.0, "record-sampling-rate": 0.1, "rounds": 3,
          "local-epochs": 2}
PLAN = RecordLevelModel(1.0, 0.1, 2, 1e-5)


def _context(node_config: dict, **run) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=default_run_config(**{**RECORD, **run}))


def _train(context: Context, server_round: int) -> tuple[Message, list[int]]:
    trained = []

    def call_next(msg, _ctx):
        trained.append(server_round)
        return Message(RecordDict(), reply_to=msg)

    msg = Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}),
                  dst_node_id=7, message_type="train")
    return record_budget_mod(msg, context, call_next), trained


def test_a_site_whose_budget_is_below_the_plan_refuses_and_never_trains():
    context = _context({"max-record-epsilon": record_epsilon(PLAN, 3) - 0.01})
    reply, trained = _train(context, 1)
    assert reply.has_error() and trained == []
    assert "the plan" in reply.error.reason and "max-record-epsilon" in reply.error.reason
    assert trained_models(context) == []


def test_a_site_stops_in_the_round_that_would_take_its_own_ledger_past_its_budget():
    """The plan (3 rounds) fits, but a server that asks for a fourth is refused there."""
    context = _context({"max-record-epsilon": record_epsilon(PLAN, 3) + 1e-9})
    for server_round in (1, 2, 3):
        reply, trained = _train(context, server_round)
        assert not reply.has_error() and trained == [server_round]
    reply, trained = _train(context, 4)
    assert reply.has_error() and trained == []
    assert "trained 3 round(s)" in reply.error.reason and "stops training" in reply.error.reason
    ledger = context.state.config_records[LEDGER_KEY]
    assert list(ledger["rounds"]) == [1, 2, 3] and len(trained_models(context)) == 3


def test_the_ledger_counts_every_training_even_of_a_repeated_round():
    context = _context({})
    for server_round in (1, 1, 2):
        assert not _train(context, server_round)[0].has_error()
    assert list(context.state.config_records[LEDGER_KEY]["rounds"]) == [1, 1, 2]
    assert trained_models(context) == [PLAN] * 3


def test_a_budget_with_record_level_dp_off_is_refused_as_infinite():
    reply, trained = _train(_context({"max-record-epsilon": 50.0}, **{"record-noise": 0.0}), 1)
    assert reply.has_error() and "epsilon = inf" in reply.error.reason and trained == []


def test_without_record_level_dp_or_a_budget_the_mod_passes_and_keeps_no_ledger():
    context = _context({}, **{"record-noise": 0.0})
    reply, trained = _train(context, 1)
    assert not reply.has_error() and trained == [1]
    assert LEDGER_KEY not in context.state.config_records


def test_a_calibrated_sigma_is_cached_in_node_state_and_meets_the_target():
    context = _context({"max-record-epsilon": 3.0},
                       **{"record-noise": 0.0, "target-record-epsilon": 3.0})
    assert not _train(context, 1)[0].has_error()
    (model,) = trained_models(context)
    assert record_epsilon(model, 3) <= 3.0 < record_epsilon(model.__class__(
        model.noise_multiplier * 0.99, model.sampling_rate, model.local_epochs, model.delta), 3)
    assert context.state.config_records["record-calibration"]["noise"] == model.noise_multiplier


@pytest.mark.parametrize("key,value", [("record-noise", -1.0), ("record-sampling-rate", 0.0),
                                       ("record-clip", 0.0)])
def test_bad_record_values_fail_on_the_node_too(key, value):
    from dpfl_app.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        validate(default_run_config(**{**RECORD, key: value}))
