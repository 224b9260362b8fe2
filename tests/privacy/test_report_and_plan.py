"""Tests for the plain-words report and the `dpfl plan` CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
try:
    import dpfl_app  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT))

from dpfl_app.tools.cli import main  # noqa: E402
from dpfl_app.privacy.accounting import AccountingModel, PrivacyLedger, epsilon_after  # noqa: E402
from dpfl_app.privacy.report import privacy_report, strength  # noqa: E402

# McMahan et al. 2018's question: noise growing with the cohort (z = 0.005 m), RDP as there.
RATIO_EXAMPLE = ["plan", "--population", "50000", "--rounds", "100", "--delta", "1e-4",
                 "--target-epsilon", "2", "--noise-to-clients-ratio", "0.005",
                 "--accountant", "rdp"]


def _ledger(sampling, z, n, m, delta, rounds):
    ledger = PrivacyLedger(AccountingModel(sampling, z, n, m, delta))
    ledger.compose_round(rounds)
    return ledger


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "dpfl_app.tools", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("eps,word", [
    (0.0, "strong"), (1.0, "strong"), (1.01, "moderate"), (8.0, "moderate"), (8.01, "weak"),
    (20.0, "weak"), (20.01, "no meaningful protection"), (float("inf"), "no meaningful protection"),
    (float("nan"), "no meaningful protection"),
])
def test_strength_categories(eps, word):
    assert strength(eps) == word


@pytest.mark.parametrize("sampling,eps_text,model_words", [
    ("poisson", "ε=51.68", ["Poisson sampling", "add-or-remove-one", "PLD accountant"]),
    ("fixed", "ε=180.5", ["without replacement", "replace-one", "z/2 = 0.15", "RDP accountant"]),
])
def test_the_default_report_says_not_private(sampling, eps_text, model_words):
    text = privacy_report(_ledger(sampling, 0.3, 10, 6, 1e-5, 5), 5, stop_reason="num_rounds reached")
    assert f"user-level ({eps_text}, δ=1e-05)-DP for any single client's entire data, under" in text
    for words in model_words + ["N = 10", "m = 6", "z = 0.3", "5 rounds"]:
        assert words in text
    assert "no meaningful protection" in text
    assert "should NOT be considered private" in text
    assert "start from a recipe instead" in text and "`recipes/`" in text
    assert "What would reach ε ≤ 8" in text
    assert "you need noise ≥" in text
    assert "not reachable, even with all N = 10 clients" in text
    assert "num_rounds reached" in text
    assert "not covered" in text.lower() and "evaluation metrics" in text
    assert "No DP noise" not in text


def test_the_recipe_hint_gives_a_command_that_names_a_real_recipe_and_federation():
    """The report's way out of "not private" is a command to copy, not a placeholder."""
    import re
    import tomllib

    from dpfl_app.privacy.report import RECIPES_HINT

    commands = re.findall(r"`(flwr run [^`]*)`", RECIPES_HINT)
    assert len(commands) == 2  # user-level (1,437 users) and record-level (10 sites)
    connections = tomllib.loads((ROOT / ".flwr" / "config.toml").read_text())["superlink"]
    for command in commands:
        assert "<" not in command, command
        connection, recipe = re.fullmatch(r"flwr run \. (\S+) --run-config (\S+)",
                                          command).groups()
        assert (ROOT / recipe).is_file(), recipe
        assert connection in connections, connection
    assert re.search(r"\d+-\d+ min", RECIPES_HINT)  # how long a recipe takes


@pytest.mark.parametrize("z,eps_text,word,not_private", [
    (0.5, "ε=23.27", "no meaningful protection", True),  # just above 20
    (0.8, "ε=11.54", "weak", False),
])
def test_not_private_warning_starts_above_20(z, eps_text, word, not_private):
    text = privacy_report(_ledger("poisson", z, 10, 6, 1e-5, 5), 5)
    assert f"({eps_text}, δ=1e-05)-DP" in text
    assert f"**Strength:** {word}." in text
    assert ("should NOT be considered private" in text) is not_private
    assert ("`recipes/`" in text) is not_private


def test_moderate_report_and_ratio_recommendation():
    # reference (dp_accounting PLD): N=100, m=10, z=1, 20 rounds -> 3.591 (moderate)
    text = privacy_report(_ledger("poisson", 1.0, 100, 10, 1e-5, 20), 20)
    assert "(ε=3.591, δ=1e-05)-DP" in text
    assert "**Strength:** moderate." in text
    assert "NOT be considered private" not in text
    assert "What would reach ε ≤ 1" in text  # already within 8: show the way to 'strong'
    assert "at most 2 clients per round" in text


def test_reachable_by_more_clients_at_same_noise_per_average():
    # a planning ratio z/m = 0.005 (noise that grows with the cohort, McMahan et
    # al. 2018) with N = 50000, 100 rounds, but only m = 60: RDP eps 11.97
    model = AccountingModel("poisson", 0.3, 50000, 60, 1e-4)
    ledger = PrivacyLedger(model, headline="rdp")
    ledger.compose_round(100)
    text = privacy_report(ledger, 100)
    assert "(ε=11.97, δ=0.0001)-DP" in text and "**Strength:** weak." in text
    assert "PLD accountant gives ε = 9.027" in text
    assert "≥ 71 clients per round (with z = 0.355)" in text
    assert "at most 12 clients per round" in text
    # check those answers independently of the report
    assert epsilon_after(model.replace(clients_per_round=71, noise_multiplier=0.355), 100) <= 8
    assert epsilon_after(model.replace(clients_per_round=70, noise_multiplier=0.35), 100) > 8
    assert epsilon_after(model.replace(clients_per_round=12), 100) <= 8
    assert epsilon_after(model.replace(clients_per_round=13), 100) > 8


def test_zero_noise_report_and_unaccounted_rounds():
    text = privacy_report(_ledger("fixed", 0.0, 10, 6, 1e-5, 3), 4)
    assert "No DP noise was added" in text
    assert "ε=∞" in text
    assert "should NOT be considered private" in text
    assert "1 unaccounted round(s) are NOT covered" in text


def test_delta_not_below_one_over_n_is_flagged():
    assert "not well below 1/N" in privacy_report(_ledger("poisson", 2.0, 10, 2, 0.2, 1), 1)
    assert "not well below 1/N" not in privacy_report(_ledger("poisson", 2.0, 10, 2, 1e-5, 1), 1)


def test_plan_cli_ratio_example_text_and_json(capsys):
    res = _cli(*RATIO_EXAMPLE)
    assert res.returncode == 0, res.stderr
    assert "m = 124 clients per round, noise multiplier z = 0.62" in res.stdout
    assert "RDP ε = 1.97" in res.stdout
    assert "not well below 1/N" in res.stdout  # 1e-4 vs 1/50000 = 2e-5
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert main([*RATIO_EXAMPLE, "--json"]) == 0  # same entry point, in-process (faster)
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == {"clients_per_round": 124, "noise_multiplier": pytest.approx(0.62)}
    assert out["epsilon"]["rdp"] == pytest.approx(1.9697, abs=1e-3)
    rdp = [row["rdp"] for row in out["curve"]]
    assert rdp == sorted(rdp) and out["curve"][-1]["rounds"] == 100


@pytest.mark.parametrize("sampling,headline", [("poisson", "pld"), ("fixed", "rdp")])
def test_plan_defaults_to_the_accountant_of_the_runs_headline(capsys, sampling, headline):
    from dpfl_app.strategy.build import choose_noise

    assert main(["plan", "-N", "10", "-T", "5", "--delta", "1e-5", "--target-epsilon", "8",
                 "--clients", "6", "--sampling", sampling, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accountant"] == headline
    cfg = {"target-epsilon": 8.0, "target-delta": 1e-5, "rounds": 5, "clients": 6,
           "sampling": sampling, "noise": 0.3, "simulate-population": 0, "simulate-clients": 0}
    # the noise the app would calibrate for the same target: the plan's answer
    assert out["answer"]["noise_multiplier"] == pytest.approx(choose_noise(cfg, 10), rel=1e-6)


def test_plan_cli_help_exits_zero():
    res = _cli("plan", "--help")
    assert res.returncode == 0
    for flag in ("--population", "--rounds", "--delta", "--target-epsilon", "--noise", "--clients",
                 "--sampling", "--noise-to-clients-ratio", "--json"):
        assert flag in res.stdout


def test_plan_in_process_modes(capsys):
    assert main(["plan", "-N", "10", "-T", "5", "--delta", "1e-5", "--noise", "0.3", "--clients", "6",
                 "--sampling", "fixed", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"]["rdp"] == pytest.approx(180.48, abs=0.05) and out["epsilon"]["pld"] is None
    assert out["strength"] == "no meaningful protection"
    assert main(["plan", "-N", "3383", "-T", "100", "--delta", "1e-5", "--target-epsilon", "2",
                 "--noise", "1.2", "--accountant", "rdp"]) == 0
    assert "m = 120 clients per round" in capsys.readouterr().out
    assert main(["plan", "-N", "10", "-T", "5", "--delta", "1e-5", "--noise", "0", "--clients", "6",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] == {"rdp": "inf", "pld": "inf"}


@pytest.mark.parametrize("args,message", [
    (["--target-epsilon", "2"], "needs one of"),
    (["--noise", "1.0"], "give --target-epsilon"),
    (["--noise", "1", "--clients", "11"], "cannot exceed"),
    (["--target-epsilon", "2", "--noise-to-clients-ratio", "0.1", "--noise", "1"], "do not combine"),
    (["--noise-to-clients-ratio", "0.1"], "needs --target-epsilon"),
    (["--target-epsilon", "2", "--clients", "3", "--sampling", "fixed", "--accountant", "pld"],
     "does not apply"),
    (["--target-epsilon", "-1", "--clients", "3"], "--target-epsilon must be"),
])
def test_plan_cli_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "-N", "10", "-T", "5", "--delta", "1e-5", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_report_states_the_threat_model_of_each_mode():
    from dpfl_app.privacy.accounting import AccountingModel, PrivacyLedger
    from dpfl_app.privacy.report import privacy_report

    ledger = PrivacyLedger(AccountingModel("poisson", 1.0, 100, 10, 1e-5))
    ledger.compose_round()
    central = privacy_report(ledger, 1)
    secure = privacy_report(ledger, 1, secure_aggregation=True)
    assert "sees every sampled client's clipped update" in central
    assert "un-noised sum" in secure and "no single update" in secure
    assert "Prio" in secure and "Prio" not in central
