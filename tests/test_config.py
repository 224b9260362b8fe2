"""Every run-config key rejects a bad value with a message naming key, value and rule."""

from __future__ import annotations

import time

import pytest

from dpfl_app.config import KEYS, ConfigError, validate
from dpfl_app.strategy.dp_fedavg import NotEnoughNodes, wait_for_nodes
from tests.fakes import FakeGrid
from tests.inprocess import default_run_config

# key -> (bad value, fragment of the allowed-values text)
BAD_VALUES = {
    "noise": (-1.0, ">= 0"),
    "rounds": (0, ">= 1"),
    "clients": (0, ">= 1"),
    "sampling": ("bernoulli", "poisson, fixed"),
    "local-epochs": (0, ">= 1"),
    "batch-size": (-8, ">= 1"),
    "lr": (-0.1, "> 0"),
    "server-lr": (0.0, "> 0"),
    "server-optimizer": ("lamb", "sgd, momentum, adam"),
    "simulate-population": (-1, "an integer >= 0"),
    "simulate-clients": (-1, "an integer >= 0"),
    "server-momentum": (1.0, "[0, 1)"),
    "dataset": ("imagenet", "digits"),
    "model": ("resnet", "digits-mlp"),
    "partitioning": ("by-zip-code", "iid"),
    "dirichlet-alpha": (0.0, "> 0"),
    "data-dir": (3.5, "str"),
    "image-column": (True, "str"),
    "label-column": (1.5, "str"),
    "node-data": ("everywhere", "partitions, local"),
    "initial-clip": (0.0, "> 0"),
    "target-quantile": (1.5, "[0, 1]"),
    "clip-lr": (-0.2, "> 0"),
    "clipped-count-stddev": ("lots", "auto or a number"),
    "target-delta": (1.0, "(0, 1)"),
    "max-epsilon": (-3.0, ">= 0"),
    "target-epsilon": (-1.0, ">= 0"),
    "seed": (-1, ">= 0"),
    "deterministic-noise": ("yes", "bool"),
    "secure-aggregation": ("on", "bool"),
    "secagg-neighbours": (-2, ">= 0"),
    "noise-at": ("both", "server, clients"),
    "audit-canaries": (1, "0 (off) or an integer >= 2"),
    "client-eval": (1, "bool"),
    "population": (-1, ">= 0"),
    "round-timeout": (0.0, "> 0"),
    "node-wait-timeout": (-5.0, "> 0"),
    "output-dir": ("", "non-empty"),
    "resume-from": (7.5, "str"),
    "tracking": ("wandb", "none, tensorboard, mlflow"),
    "tracking-uri": (5, "str"),
    "verbose": ("loud", "bool"),
    "mechanism": ("dp-sgd", "dp-fedavg, dp-ftrl"),
    "min-separation": (0, "an integer >= 1"),
    "ftrl-bands": (-1, "an integer >= 0"),
    "record-noise": (-0.5, ">= 0"),
    "record-clip": (0.0, "> 0"),
    "record-sampling-rate": (1.5, "(0, 1]"),
    "target-record-epsilon": (-2.0, ">= 0"),
    "record-delta": (0.0, "(0, 1)"),
}


@pytest.mark.parametrize("key,bad", [("record-sampling-rate", 0.0), ("record-clip", -1.0),
                                     ("record-delta", 1.0)])
def test_record_level_bounds_are_checked_at_both_ends(key, bad):
    with pytest.raises(ConfigError, match=repr(key)):
        validate(default_run_config(**{key: bad}))


def test_the_table_covers_every_key():
    assert set(BAD_VALUES) == set(KEYS)


def test_the_defaults_are_valid():
    validate(default_run_config())


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_bad_value_names_key_value_and_what_is_allowed(key):
    bad, allowed = BAD_VALUES[key]
    with pytest.raises(ConfigError) as err:
        validate(default_run_config(**{key: bad}))
    message = str(err.value)
    assert repr(key) in message and repr(bad) in message and allowed in message, message


def test_misspelled_key_is_named_with_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown run-config key\(s\) 'nosie'.*allowed keys"):
        validate(default_run_config(nosie=1.0))


def test_conflicting_budget_keys():
    with pytest.raises(ConfigError, match="target-epsilon=10.0 exceeds max-epsilon=5.0"):
        validate(default_run_config(**{"target-epsilon": 10.0, "max-epsilon": 5.0}))


def test_noise_at_clients_requires_secure_aggregation_and_is_refused_until_wired():
    with pytest.raises(ConfigError, match="noise-at=clients requires secure-aggregation=true"):
        validate(default_run_config(**{"noise-at": "clients"}))
    with pytest.raises(ConfigError, match="noise-at=clients is not available yet"):
        validate(default_run_config(**{"noise-at": "clients", "secure-aggregation": True}))
    assert validate(default_run_config(**{"secure-aggregation": True}))["noise-at"] == "server"


def test_explicit_count_stddev_too_small_for_noise_fails_before_training(tmp_path):
    from tests.inprocess import run_server

    cfg = default_run_config(**{"noise": 1.0, "clipped-count-stddev": "0.3",
                                "output-dir": str(tmp_path / "out")})
    with pytest.raises(ValueError, match="clipped-count-stddev=0.3"):
        run_server(cfg)
    assert not (tmp_path / "out").exists()


def test_too_few_supernodes_fails_after_a_bounded_wait():
    start = time.monotonic()
    with pytest.raises(NotEnoughNodes, match=r"only 3 SuperNode\(s\).*clients=6.*Start more"):
        wait_for_nodes(FakeGrid(3), needed=6, timeout=1.0)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("key,value,fragment", [
    ("secure-aggregation", True, "secure aggregation is not implemented for dp-ftrl"),
    ("resume-from", "outputs/run1", "cannot be resumed"),
    ("audit-canaries", 4, "audit-canaries=0"),
    ("simulate-population", 1000, "simulate-population=0"),
])
def test_dp_ftrl_refuses_what_it_does_not_support_in_one_line(key, value, fragment):
    extra = {"simulate-clients": 10} if key == "simulate-population" else {}
    with pytest.raises(ConfigError) as err:
        validate(default_run_config(mechanism="dp-ftrl", **{key: value}, **extra))
    message = str(err.value)
    assert "\n" not in message and repr(key) in message and fragment in message, message


def test_min_separation_is_refused_where_it_would_mean_nothing():
    with pytest.raises(ConfigError, match="applies only to mechanism='dp-ftrl'"):
        validate(default_run_config(**{"min-separation": 3}))
    validate(default_run_config(**{"mechanism": "dp-ftrl", "min-separation": 3}))


def test_ftrl_bands_only_with_dp_ftrl_and_never_more_than_the_separation():
    with pytest.raises(ConfigError, match="'ftrl-bands' = 1 applies only to mechanism='dp-ftrl'"):
        validate(default_run_config(**{"ftrl-bands": 1}))
    with pytest.raises(ConfigError) as err:  # p > b: the closed-form sensitivity would be wrong
        validate(default_run_config(**{"mechanism": "dp-ftrl", "min-separation": 2,
                                       "ftrl-bands": 3}))
    assert "\n" not in str(err.value) and "1..2" in str(err.value), err.value
    with pytest.raises(ConfigError, match="1..3"):  # nor more than the rounds
        validate(default_run_config(**{"mechanism": "dp-ftrl", "min-separation": 5,
                                       "rounds": 3, "ftrl-bands": 4}))
    validate(default_run_config(**{"mechanism": "dp-ftrl", "min-separation": 3, "ftrl-bands": 3}))
