"""Run-config keys: one table of names, types, defaults and allowed values.

Every key of `[tool.flwr.app.config]` is checked here before anything starts,
and a bad one fails with a message naming the key, the value and what is
allowed. The defaults live in pyproject.toml; this table only validates.

Importing this module must stay cheap (no torch, no dp-accounting, no data
loading): the ServerApp validates before anything heavy is imported, so a bad
value fails within seconds (tests/test_first_run.py checks sys.modules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from dpfl_app.data.datasets import CLIENT_VAL_FRACTION, DATASETS, PARTITIONINGS, describe
from dpfl_app.privacy import SAMPLING_MODES
from dpfl_app.data.registry import is_hub_id
from dpfl_app.data.settings import ClientSettings, node_source
from dpfl_app.errors import ConfigError


@dataclass(frozen=True)
class Key:
    kind: type  # int, float, str or bool
    check: Callable[[Any], bool] = lambda v: True
    allowed: str = ""  # words for the error message
    numbers_as_text: bool = False  # a str key that also takes a number (e.g. "auto" or 2.0)


def _choice(options) -> Key:
    return Key(str, lambda v: v in options, "one of " + ", ".join(options))


POSITIVE_INT = Key(int, lambda v: v >= 1, "an integer >= 1")
POSITIVE = Key(float, lambda v: v > 0, "a number > 0")
NON_NEGATIVE = Key(float, lambda v: v >= 0, "a number >= 0")
UNIT = Key(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
# Where each SuperNode's data comes from: its demo partition of `dataset`
# (node config partition-id/num-partitions), or its own files (data-path).
NODE_DATA = ("partitions", "local")
# The model names of task.MODELS, here so that validating needs no torch
# (a test checks that both lists agree).
MODEL_NAMES = ("digits-linear", "digits-mlp", "digits-cnn", "mnist-cnn", "lenet")
# strategy/server_optimizer.py's optimizers, here for the same reason (a test checks).
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
# run/tracking.py's experiment trackers (a test checks).
TRACKERS = ("none", "tensorboard", "mlflow")
# Who adds the update noise: the server after the (secure) sum, or the clients, as
# Skellam shares under secure aggregation (distributed DP: privacy/distributed.py).
NOISE_AT = ("server", "clients")
# dp-fedavg: amplification by the server's sampling; dp-ftrl: correlated noise and a
# participation bound the clients enforce (strategy/dp_ftrl.py).
MECHANISMS = ("dp-fedavg", "dp-ftrl")

KEYS: dict[str, Key] = {
    "noise": NON_NEGATIVE,
    "rounds": POSITIVE_INT,
    "clients": POSITIVE_INT,
    # N for the accountant; 0 = the number of SuperNodes connected at the start.
    "population": Key(int, lambda v: v >= 0,
                      "an integer >= 0 (0 = the SuperNodes connected at the start)"),
    "sampling": _choice(SAMPLING_MODES),
    "local-epochs": POSITIVE_INT,
    "batch-size": POSITIVE_INT,
    "lr": POSITIVE,
    "server-lr": POSITIVE,
    "server-optimizer": _choice(SERVER_OPTIMIZERS),
    "server-momentum": Key(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "dataset": Key(str, lambda v: v in DATASETS or is_hub_id(v),
                   "one of " + ", ".join(DATASETS) + ", or a Hugging Face dataset id owner/name"),
    "model": Key(str, lambda v: v == "auto" or v in MODEL_NAMES,
                 "auto or one of " + ", ".join(MODEL_NAMES)),
    "partitioning": _choice(PARTITIONINGS),
    "dirichlet-alpha": POSITIVE,
    "data-dir": Key(str),  # "" = no local copy: the Hub, or its cache
    "image-column": Key(str),  # "" = the dataset's own
    "label-column": Key(str),
    "node-data": _choice(NODE_DATA),
    "initial-clip": POSITIVE,
    "target-quantile": UNIT,
    "clip-lr": POSITIVE,
    "clipped-count-stddev": Key(
        str, lambda v: v == "auto" or _is_number(v, minimum=0), "auto or a number > 0",
        numbers_as_text=True,
    ),
    "target-delta": Key(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "max-epsilon": NON_NEGATIVE,
    "target-epsilon": NON_NEGATIVE,
    "seed": Key(int, lambda v: v >= 0, "an integer >= 0"),
    "simulate-population": Key(int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "simulate-clients": Key(int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "deterministic-noise": Key(bool),
    "secure-aggregation": Key(bool),
    "noise-at": _choice(NOISE_AT),
    # noise-at=clients: bits b of the modular sum, and t / m, the fewest survivors (as a
    # fraction of m) whose sum is released; each client's Skellam share is calibrated for t.
    "noise-bits": Key(int, lambda v: 8 <= v <= 62, "an integer in [8, 62]"),
    "noise-threshold": Key(float, lambda v: 0 < v <= 1, "a number in (0, 1] (a fraction of "
                           "clients)"),
    "secagg-neighbours": Key(int, lambda v: v >= 0, "an integer >= 0 (0 = all others)"),
    # two fitted Gaussians need at least two canaries of each kind
    "audit-canaries": Key(int, lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2"),
    "client-eval": Key(bool),
    "mechanism": _choice(MECHANISMS),
    "min-separation": Key(int, lambda v: v >= 1, "an integer >= 1 (rounds between two "
                          "participations of the same client, dp-ftrl)"),
    "ftrl-bands": Key(int, lambda v: v >= 0, "an integer >= 0 (0 = the bands with the "
                      "least error; 1 = the identity, fresh noise every round)"),
    "round-timeout": POSITIVE,
    "node-wait-timeout": POSITIVE,
    "output-dir": Key(str, lambda v: v != "", "a non-empty path"),
    "resume-from": Key(str),
    "tracking": _choice(TRACKERS),
    "tracking-uri": Key(str),  # mlflow only; "" = a SQLite file in output-dir
    "verbose": Key(bool),
    # Record-level DP-SGD inside each site (dpfl_app/client/dp_sgd.py); 0 noise = off.
    "record-noise": NON_NEGATIVE,
    "record-clip": POSITIVE,
    "record-sampling-rate": Key(float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "target-record-epsilon": NON_NEGATIVE,
    "record-delta": Key(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
}


def _is_number(text: Any, minimum: float) -> bool:
    try:
        return float(text) > minimum and math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


def _coerce(name: str, value: Any, key: Key) -> Any:
    """Accept ints for floats and numbers for strings; refuse everything else."""
    if key.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if key.numbers_as_text and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, key.kind) or (key.kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"run-config key {name!r} = {value!r} has type {type(value).__name__}; "
            f"expected {key.kind.__name__}" + (f" ({key.allowed})" if key.allowed else "")
        )
    if key.kind is float and not math.isfinite(value):
        raise ConfigError(f"run-config key {name!r} = {value!r} must be finite")
    return value


def check_value(name: str, value: Any) -> Any:
    """One key's value, coerced and checked on its own (e.g. for a sweep's grid)."""
    key = KEYS[name]
    value = _coerce(name, value, key)
    if not key.check(value):
        raise ConfigError(f"run-config key {name!r} = {value!r} is invalid; allowed: {key.allowed}")
    return value


def validate(run_config: dict[str, Any]) -> dict[str, Any]:
    """Check every key of a run config; return it with values coerced."""
    unknown = sorted(set(run_config) - set(KEYS))
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {', '.join(map(repr, unknown))}; "
            f"allowed keys: {', '.join(sorted(KEYS))}"
        )
    missing = sorted(set(KEYS) - set(run_config))
    if missing:
        raise ConfigError(f"run-config key(s) {', '.join(missing)} missing from pyproject.toml")
    clean = {}
    for name in KEYS:
        clean[name] = check_value(name, run_config[name])
    if 0 < clean["max-epsilon"] < clean["target-epsilon"]:
        raise ConfigError(
            f"target-epsilon={clean['target-epsilon']} exceeds max-epsilon="
            f"{clean['max-epsilon']}: the run would stop before reaching its target; "
            "set target-epsilon <= max-epsilon, or one of them to 0 (off)"
        )
    if 0 < clean["population"] < clean["clients"]:
        raise ConfigError(
            f"run-config key 'clients' = {clean['clients']} exceeds population="
            f"{clean['population']}; allowed: 1..population (or population=0)"
        )
    _check_simulation(clean)
    _check_secure_aggregation(clean)
    _check_noise_at(clean)
    _check_mechanism(clean)
    return clean


def _check_noise_at(cfg: dict[str, Any]) -> None:
    """noise-at=clients needs secure aggregation; some keys have no meaning with it."""
    if cfg["noise-at"] != "clients":
        return
    if not cfg["secure-aggregation"]:
        raise ConfigError("noise-at=clients requires secure-aggregation=true (without it the "
                          "server sees each client's noised update); set secure-aggregation=true "
                          "or noise-at=server")
    for key, why in CLIENT_NOISE_EXCLUDES.items():
        if cfg[key] not in (False, 0, ""):
            raise ConfigError(f"noise-at=clients: {key}={cfg[key]!r} is not supported: {why}")


# Keys that noise-at=clients does not support, and why, in the one line a user sees.
CLIENT_NOISE_EXCLUDES = {
    "deterministic-noise": "the clients draw their noise shares from their own secure "
                           "generators, which no seed reproduces; set deterministic-noise=false",
    "simulate-population": "the clients' shares are the noise of the real cohort, which cannot "
                           "simulate a larger one; set simulate-population=0",
    "resume-from": "resuming a run with client noise is not supported yet; start a new run",
}


# Keys that dp-ftrl does not support, and why, in the one line a user sees.
FTRL_EXCLUDES = {
    "secure-aggregation": "secure aggregation is not implemented for dp-ftrl; set "
                          "secure-aggregation=false or mechanism='dp-fedavg'",
    "resume-from": "a dp-ftrl run cannot be resumed: its correlated noise buffer is secret "
                   "and never saved; start a new run",
    "audit-canaries": "the privacy audit samples canaries like dp-fedavg's clients; use "
                      "mechanism='dp-fedavg' or audit-canaries=0",
    "simulate-population": "simulating a larger deployment is dp-fedavg only; set "
                           "simulate-population=0",
}


def _check_mechanism(cfg: dict[str, Any]) -> None:
    """dp-ftrl's exclusions, and min-separation and ftrl-bands only where they mean something."""
    if cfg["mechanism"] == "dp-fedavg":
        for key, default in (("min-separation", 1), ("ftrl-bands", 0)):
            if cfg[key] != default:
                raise ConfigError(
                    f"run-config key {key!r} = {cfg[key]} applies only to mechanism='dp-ftrl'; "
                    f"leave it at {default} with dp-fedavg (or set mechanism='dp-ftrl')")
        return
    problem = ftrl_bands_problem(cfg["ftrl-bands"], cfg["min-separation"], cfg["rounds"])
    if problem:
        raise ConfigError(f"run-config key 'ftrl-bands' = {cfg['ftrl-bands']}: {problem}")
    for key, why in FTRL_EXCLUDES.items():
        if cfg[key] not in (False, 0, ""):
            raise ConfigError(f"run-config key {key!r} = {cfg[key]!r} with mechanism='dp-ftrl': {why}")


def ftrl_bands_problem(bands: int, min_separation: int, rounds: int) -> str | None:
    """What is allowed, when `ftrl-bands` is not (run config and `dpfl plan` alike): more
    bands than b make the closed-form sensitivity wrong; None when it is allowed."""
    most = min(min_separation, rounds)
    if 0 <= bands <= most:
        return None
    return f"allowed 0 (chosen by error) or 1..min(min-separation, rounds) = 1..{most}"


def record_level_on(cfg: dict[str, Any]) -> bool:
    """Whether each site runs DP-SGD: `record-noise` > 0 or `target-record-epsilon` > 0."""
    return cfg["record-noise"] > 0 or cfg["target-record-epsilon"] > 0


def user_level_dp_on(cfg: dict[str, Any]) -> bool:
    """Whether the server adds user-level noise: `noise` > 0 or `target-epsilon` > 0."""
    return cfg["noise"] > 0 or cfg["target-epsilon"] > 0


def user_level_clip_on(cfg: dict[str, Any]) -> bool:
    """Whether clients clip their updates to the adaptive norm C_t (and the server releases
    the noised count of unclipped updates that moves C_t).

    Off for record-level DP alone (DP-SGD at the sites, no user-level noise): each site's
    own noise bounds what its update reveals about any record, and a clip with no server
    noise protects nothing while it costs accuracy. The clients (client/mods.py), the
    strategy (strategy/build.py) and the study engine all ask this one predicate.
    Kept where the clip serves something else: secure aggregation (C_t is the quantization
    range of the masked sum), dp-ftrl and the privacy audit (both built on C_t).
    """
    return (user_level_dp_on(cfg) or not record_level_on(cfg) or cfg["secure-aggregation"]
            or cfg["mechanism"] != "dp-fedavg" or cfg["audit-canaries"] > 0)



def _check_secure_aggregation(cfg: dict[str, Any]) -> None:
    """A cohort and neighbourhood the clients' floors accept (dpfl_app.secagg.floors)."""
    from dpfl_app.secagg import floors  # pylint: disable=import-outside-toplevel

    if not cfg["secure-aggregation"]:
        return
    announced = cfg["simulate-clients"] or cfg["clients"]  # the m the clients are told
    if cfg["clients"] < floors.min_cohort(announced):
        raise ConfigError(
            f"secure-aggregation=true needs clients >= {floors.min_cohort(announced)} when "
            f"m={announced} is announced: clients refuse fewer than "
            f"{floors.neighbour_floor(announced)} neighbours; got clients={cfg['clients']}")
    k = cfg["secagg-neighbours"]
    if 0 < k < floors.neighbour_floor(announced):
        raise ConfigError(
            f"secagg-neighbours={k} is below the clients' floor "
            f"{floors.neighbour_floor(announced)} for m={announced} (max(2, min("
            f"{floors.MIN_NEIGHBOURS}, m // 2))); allowed: 0 (all others) or >= that floor")




def _check_simulation(cfg: dict[str, Any]) -> None:
    """simulate-population and simulate-clients: both off, or a cohort within the population."""
    big_n, big_m = cfg["simulate-population"], cfg["simulate-clients"]
    if (big_n == 0) != (big_m == 0):
        raise ConfigError(
            f"simulate-population={big_n} and simulate-clients={big_m}: set both (a simulated "
            "deployment of N users with cohorts of m) or neither (0 = off)")
    if big_n and not cfg["clients"] <= big_m <= big_n:
        raise ConfigError(
            f"simulate-clients={big_m} must be between clients={cfg['clients']} (the real "
            f"cohort) and simulate-population={big_n}")


def data_source(cfg: dict[str, Any]) -> dict[str, str]:
    """Where the dataset's files are and which columns to read, as data.py's kwargs."""
    return {"data_dir": cfg["data-dir"], "image_column": cfg["image-column"],
            "label_column": cfg["label-column"]}


def model_spec(cfg: dict[str, Any]) -> tuple[str, int]:
    """(model name, number of classes): `model`, or the dataset's default when `auto`."""
    spec = describe(cfg["dataset"], **data_source(cfg))
    return (spec.model if cfg["model"] == "auto" else cfg["model"]), spec.num_classes


def client_settings(context) -> ClientSettings:
    """Validated settings from a ClientApp's `Context`."""
    cfg = validate(dict(context.run_config))
    node = node_source(context.node_config, cfg["node-data"])
    model, num_classes = model_spec(cfg)
    return ClientSettings(
        dataset=cfg["dataset"], model=model, partitioning=cfg["partitioning"],
        dirichlet_alpha=cfg["dirichlet-alpha"], seed=cfg["seed"],
        local_epochs=cfg["local-epochs"], batch_size=cfg["batch-size"], lr=cfg["lr"],
        data_dir=cfg["data-dir"], image_column=cfg["image-column"],
        label_column=cfg["label-column"],
        num_classes=num_classes, **node,
        # Only client-side evaluation reads a validation split; without it, train on all data.
        val_fraction=CLIENT_VAL_FRACTION if cfg["client-eval"] else 0.0,
    )
