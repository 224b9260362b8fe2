"""Every suggested or calibrated value meets its target when used exactly as printed:
the text of `dpfl plan` and of privacy.md is parsed back and re-accounted."""

import re

import pytest

from dpfl_app.privacy.accounting import AccountingModel, PrivacyLedger, epsilon_after
from dpfl_app.privacy.report import privacy_report
from dpfl_app.tools.cli import main

N, T, DELTA = 100, 20, 1e-5
TARGETS = (0.7, 2.0, 8.0, 16.0)
ANSWER = re.compile(r"Answer: m = (\d+) clients per round, noise multiplier z = ([0-9.e+-]+) ")


def _plan_answer(capsys, *args) -> tuple[int, float] | None:
    """(m, z) as printed, or None when the plan says the target is not reachable."""
    assert main(["plan", "-N", str(N), "-T", str(T), "--delta", str(DELTA), *args]) == 0
    text = capsys.readouterr().out
    if "NOT reachable" in text:
        return None
    found = ANSWER.search(text)
    assert found, text
    return int(found.group(1)), float(found.group(2))


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
@pytest.mark.parametrize("mode", [("--clients", "10"), ("--noise-to-clients-ratio", "0.1"),
                                  ("--noise", "1.5")])
def test_plan_answers_meet_the_target_as_printed(capsys, sampling, mode):
    answered = 0
    for target in TARGETS:
        answer = _plan_answer(capsys, "--target-epsilon", str(target), "--sampling", sampling,
                              "--accountant", "rdp", *mode)
        if answer is None:
            continue
        answered += 1
        m, z = answer
        eps = epsilon_after(AccountingModel(sampling, z, N, m, DELTA), T, "rdp")
        assert eps <= target, (target, m, z, eps)
    assert answered >= 2  # the grid must exercise the printed answers


def test_plan_with_pld_meets_the_target_as_printed(capsys):
    for target in TARGETS:
        m, z = _plan_answer(capsys, "--target-epsilon", str(target), "--clients", "10",
                            "--accountant", "pld")
        assert epsilon_after(AccountingModel("poisson", z, N, m, DELTA), T, "pld") <= target


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_report_suggestions_meet_their_goal_as_printed(sampling):
    """privacy.md's 'What would reach epsilon <= goal' bullets, parsed back."""
    for z_now in (0.3, 0.8):
        model = AccountingModel(sampling, z_now, N, 10, DELTA)
        ledger = PrivacyLedger(model)
        ledger.compose_round(T)
        text = privacy_report(ledger, T)
        goal = float(re.search(r"What would reach ε ≤ ([0-9.]+)", text).group(1))
        acc = ledger.headline
        z_need = float(re.search(r"you need noise ≥ ([0-9.e+-]+) ", text).group(1))
        assert epsilon_after(model.replace(noise_multiplier=z_need), T, acc) <= goal
        more = re.search(r"you need ≥ (\d+) clients per round \(with z = ([0-9.e+-]+)\)", text)
        if more:
            m, z = int(more.group(1)), float(more.group(2))
            assert epsilon_after(model.replace(clients_per_round=m, noise_multiplier=z), T,
                                 acc) <= goal
        fewer = re.search(r"at most (\d+) clients per round", text)
        if fewer:
            assert epsilon_after(model.replace(clients_per_round=int(fewer.group(1))), T,
                                 acc) <= goal
