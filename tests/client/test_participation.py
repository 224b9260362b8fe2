"""A client enforces DP-FTRL's min-separation itself, from its own record in node state."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict

from dpfl_app.client.participation import STATE_KEY, min_separation_mod, refusal
import tests.inprocess  # noqa: F401  (sets Flower's TaskIdentity, which Message() needs)

ANNOUNCED = {"dp-mechanism": "dp-ftrl", "dp-min-separation": 3, "dp-rounds": 10}


def _train_message(server_round: int, **config) -> Message:
    content = RecordDict({"config": ConfigRecord({**ANNOUNCED, "server-round": server_round,
                                                  **config})})
    return Message(content, 1, "train", group_id="1")


def _ask(context: Context, server_round: int, **config) -> tuple[Message, list[int]]:
    trained: list[int] = []

    def train(msg, ctx):
        trained.append(server_round)
        return Message(RecordDict(), reply_to=msg)

    return min_separation_mod(_train_message(server_round, **config), context, train), trained


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_a_client_asked_too_soon_refuses_without_training():
    context = _context()
    reply, trained = _ask(context, 2)
    assert not reply.has_error() and trained == [2]
    assert context.state.config_records[STATE_KEY]["last-round"] == 2
    for too_soon in (2, 3, 4):  # the same round again, or fewer than b = 3 rounds later
        reply, trained = _ask(context, too_soon)
        assert reply.has_error() and trained == []
        assert "took part in round 2; min-separation 3 allows round 5" in reply.error.reason
    reply, trained = _ask(context, 5)
    assert not reply.has_error() and trained == [5]


def test_a_client_refuses_rounds_outside_the_run_and_a_weaker_separation_than_its_own():
    assert "outside the announced 1..10" in _ask(_context(), 11)[0].error.reason
    reply, trained = _ask(_context(**{"min-separation": 5}), 1)
    assert trained == [] and "below this node's node-config min-separation=5" in reply.error.reason
    missing = refusal({"dp-mechanism": "dp-ftrl", "server-round": 1}, None, {})
    assert missing is not None and "must announce" in missing


def test_dp_fedavg_messages_pass_untouched():
    context = _context()
    for _ in range(3):
        reply, trained = _ask(context, 1, **{"dp-mechanism": "dp-fedavg"})
        assert not reply.has_error() and trained == [1]
    assert STATE_KEY not in context.state.config_records


def test_a_nodes_max_epsilon_is_checked_against_dp_ftrls_own_accounting():
    """The node recomputes epsilon from the announcement (no N, no sampling rate)."""
    from dpfl_app.client import policy as client_policy
    from dpfl_app.privacy.ftrl_accounting import FtrlLedger, build_model
    from dpfl_app.strategy.dp_ftrl import ftrl_announcement

    model, _ = build_model(3.0, rounds=12, min_separation=4, clients_per_round=50, delta=1e-6)
    ledger = FtrlLedger(model)
    ledger.compose_round(12)
    announced = ftrl_announcement(model)
    assert client_policy.announced_epsilon(announced) == ledger.epsilon()
    assert client_policy.refusal(announced, {"max-epsilon": ledger.epsilon() * 1.01}) is None
    assert "gives epsilon=" in client_policy.refusal(announced,
                                                     {"max-epsilon": ledger.epsilon() * 0.99})
