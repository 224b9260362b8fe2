"""The strategy a validated run config asks for: its noise, its accounting model, its parts.

`build_strategy` wires the DP-FedAvg (or DP-FTRL) strategy from the config: the
noise split of adaptive clipping, the accounting model and ledger, secure
aggregation and the clients' noise, the canary audit, the server optimizer and
the announcement every client checks. The study engine builds its strategy
with the same function, so a study and a `flwr run` account alike. Heavy
modules (torch, dp-accounting) are imported inside the functions.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.supercore import log

from dpfl_app.strategy.large_deployment import deployment  # light: no torch

if TYPE_CHECKING:
    from dpfl_app.privacy.accounting import AccountingModel
    from dpfl_app.privacy.distributed_ledger import ClientNoisePlan
    from dpfl_app.strategy.canaries import CanaryAudit
    from dpfl_app.strategy.dp_fedavg import DPFedAvgAdaptive


def start_strategy(cfg: dict, population: int, initial_model: dict,
                   noise: float | None = None) -> tuple[float, DPFedAvgAdaptive]:
    """(noise, strategy) of a run that starts from `initial_model` (its arrays by name),
    as the ServerApp and the study engine start: `noise` given (a resumed run's), or
    `choose_noise`. The model's arrays give d and the server optimizer's shapes, so no
    model is built here; noise-at=clients plans the clients' shares once
    (`client_noise.plan_for`), and that plan gives both z and the ledger."""
    like = [np.asarray(v) for v in initial_model.values()]
    plan = None
    if cfg.get("noise-at") == "clients":
        from dpfl_app.strategy.client_noise import plan_for
        plan = plan_for(cfg, population, sum(a.size for a in like), noise)
    if noise is None:
        noise = choose_noise(cfg, population, plan)
    return noise, build_strategy(cfg, population, noise, client_plan=plan, like=like)


def choose_noise(cfg: dict, population: int, client_plan: ClientNoisePlan | None = None
                 ) -> float:
    """`noise`, or the z calibrated to meet `target-epsilon` in `rounds` rounds
    (noise-at=clients: `client_plan`'s, or a plan made here for the config's model)."""
    if cfg.get("mechanism") == "dp-ftrl":  # no population, no sampling: one Gaussian over the run
        from dpfl_app.strategy.dp_ftrl import choose_ftrl_noise
        return choose_ftrl_noise(cfg)
    if cfg["target-epsilon"] <= 0:
        return cfg["noise"]
    if cfg.get("noise-at") == "clients":  # the clients' Skellam shares, at t survivors
        from dpfl_app.strategy.client_noise import model_dim, plan_for
        plan = client_plan or plan_for(cfg, population, model_dim(cfg))
        z = plan.split.noise_multiplier
        log(INFO, "target-epsilon=%s (noise-at=clients, t survivors every round): calibrated "
            "noise multiplier z=%.6g (replaces noise=%s)", cfg["target-epsilon"], z, cfg["noise"])
        return z
    from dpfl_app.privacy.accounting import AccountingModel, headline_accountant
    from dpfl_app.privacy.calibration import calibrate_noise

    big = deployment(cfg, population)  # a simulated deployment is calibrated for itself
    population, clients = big.population, big.clients_per_round
    # Calibrate with the accountant that will report the run's epsilon.
    headline = headline_accountant(AccountingModel(cfg["sampling"], 1.0, population,
                                                   clients, cfg["target-delta"]))
    z = calibrate_noise(cfg["target-epsilon"], cfg["target-delta"], cfg["rounds"],
                        population, clients, cfg["sampling"], accountant=headline,
                        withheld_inputs=withheld_inputs(cfg, population, clients))
    log(INFO, "target-epsilon=%s: calibrated noise multiplier z=%.6g (replaces noise=%s)",
        cfg["target-epsilon"], z, cfg["noise"])
    return z


def withheld_inputs(cfg: dict, population: int, clients: int) -> int:
    """W of the accounting model: secure aggregation may withhold a round's whole sum."""
    if not cfg.get("secure-aggregation", False):
        return 0
    from dpfl_app.privacy.accounting import withheld_sum_bound

    return withheld_sum_bound(cfg["sampling"], population, clients)


def choose_record_model(cfg: dict):
    """Each site's record-level DP-SGD (a RecordLevelModel), or None when it is off."""
    from dpfl_app.client.site_ledger import planned_model

    model = planned_model(cfg)
    if model is None:
        return None
    from dpfl_app.privacy.record_level import record_epsilon

    if cfg["target-record-epsilon"] > 0:
        log(INFO, "target-record-epsilon=%s: calibrated record-noise sigma=%.6g (replaces "
            "record-noise=%s); every site calibrates the same sigma itself",
            cfg["target-record-epsilon"], model.noise_multiplier, cfg["record-noise"])
    log(INFO, "record-level DP-SGD at every site: sigma=%.4g, record-clip=%g, Poisson rate "
        "q=%g, %d steps per round; after %d rounds: record-level epsilon %.3f at delta %g for "
        "any record at any site (PLD; RDP %.3f)", model.noise_multiplier, cfg["record-clip"],
        model.sampling_rate, model.steps_per_round, cfg["rounds"],
        record_epsilon(model, cfg["rounds"]), model.delta,
        record_epsilon(model, cfg["rounds"], "rdp"))
    return model


def build_strategy(cfg: dict, population: int, noise: float, *,
                   client_plan: ClientNoisePlan | None = None,
                   like: list | None = None) -> DPFedAvgAdaptive:
    """FedAvg (sampling, evaluation) inside our DP wrapper (clipping, noise, accounting).

    `client_plan`: noise-at=clients' shares for `noise`, if already planned; `like`: the
    model's arrays (shapes for the server optimizer), if already built."""
    from flwr.serverapp.strategy import FedAvg

    from dpfl_app.config import user_level_clip_on
    from dpfl_app.privacy import mechanism
    from dpfl_app.privacy.accounting import AccountingModel, PrivacyLedger
    from dpfl_app.client import policy as client_policy
    from dpfl_app.privacy.randomness import server_generators
    from dpfl_app.strategy.dp_fedavg import DPFedAvgAdaptive
    from dpfl_app.strategy.secure_aggregation import SecureDPFedAvgAdaptive

    generators = server_generators(cfg["seed"] if cfg["deterministic-noise"] else None)
    # FedAvg addresses every online node; the strategy keeps the sampled slots.
    fedavg = FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
                    fraction_evaluate=1.0, min_evaluate_nodes=1)
    if not cfg["client-eval"]:
        # What FedAvg(fraction_evaluate=0.0) sets, without its warning "Federated
        # evaluation will be skipped" in every run (100 times in a sweep).
        fedavg.fraction_evaluate, fedavg.min_evaluate_nodes = 0.0, 0
    if cfg["deterministic-noise"]:
        log(WARNING, "deterministic-noise=true: the DP noise is reproducible from seed=%d, "
            "so there is NO privacy guarantee: epsilon is reported as inf. Fine for "
            "experiments; never deploy with it.", cfg["seed"])
    if cfg["mechanism"] == "dp-ftrl":
        from dpfl_app.strategy.dp_ftrl import build_ftrl_strategy
        return build_ftrl_strategy(cfg, noise, fedavg, generators, server_optimizer(cfg, like))
    stddev = cfg["clipped-count-stddev"]
    big = deployment(cfg, population)  # the run's own, or a simulated larger one
    split = mechanism.split_noise(noise, big.clients_per_round,
                                  None if stddev == "auto" else float(stddev))
    if split.raised:
        log(WARNING, "clipped-count-stddev raised from m/20=%.3f to %.3f so that noise z=%.4g"
            " < 2*sigma_b; update noise multiplier z_delta=%.4f", split.default_count_stddev,
            split.count_stddev, noise, split.update_noise_multiplier)
    model = AccountingModel(cfg["sampling"], noise, big.population, big.clients_per_round,
                            cfg["target-delta"],
                            withheld_inputs(cfg, big.population, big.clients_per_round))
    ledger = PrivacyLedger(model, noise_secret=generators.secret)
    canaries = audit_canaries(cfg, population)
    secure = {"neighbours": cfg["secagg-neighbours"], "stage_timeout": cfg["round-timeout"]}
    cls = SecureDPFedAvgAdaptive if cfg["secure-aggregation"] else DPFedAvgAdaptive
    client_noise = cfg.get("noise-at") == "clients"
    if client_noise:  # the clients add Skellam shares; the server adds no update noise
        from dpfl_app.strategy.client_noise import ClientNoiseDPFedAvg, client_noise_ledger
        ledger = client_noise_ledger(cfg, model.replace(withheld_inputs=0), client_plan)
        cls, secure["client_noise"] = ClientNoiseDPFedAvg, ledger.params
    user_clip = user_level_clip_on(cfg)
    if not user_clip:
        log(INFO, "record-level DP alone (noise=0, target-epsilon=0): no user-level clip. Each "
            "site sends its DP-SGD update unclipped and no clipped count is released; the "
            "record-level noise bounds the privacy, and no user-level epsilon is claimed")
    strategy = cls(
        fedavg, split, cfg["clients"], ledger, generators.noise,
        sampling_rng=generators.sampling,
        initial_clip=cfg["initial-clip"], target_quantile=cfg["target-quantile"],
        clip_lr=cfg["clip-lr"], sampling=cfg["sampling"],
        node_wait_timeout=cfg["node-wait-timeout"], max_epsilon=cfg["max-epsilon"],
        server_lr=cfg["server-lr"], canaries=canaries,
        **(secure if cfg["secure-aggregation"] else {}),
        server_optimizer=server_optimizer(cfg, like),
        noise_scale=big.noise_scale, sampling_population=population,
        user_level_clip=user_clip,
    )
    # The secure strategy's smallest summed cohort, if it has one (a client floor).
    ledger.no_dropout_floor = max(2, int(getattr(strategy, "min_cohort", 2)))
    strategy.announcement = client_policy.announcement(
        real_model(ledger.model, big), cfg["rounds"], cfg["secure-aggregation"],
        cfg["deterministic-noise"])
    if client_noise:
        from dpfl_app.privacy.distributed import announcement
        strategy.announcement.update(announcement(ledger.params))
    return strategy


def real_model(model: AccountingModel, big) -> AccountingModel:
    """This run's own clients' model: `model` itself, unless a deployment is simulated.

    A simulated deployment scales the noise on the real cohort's sum by m/m_big:
    the real clients get noise multiplier z * m/m_big, sampled m of the real N.
    """
    from dpfl_app.privacy.accounting import withheld_sum_bound

    if not big.simulated:
        return model
    return model.replace(noise_multiplier=model.noise_multiplier * big.noise_scale,
                         population=big.real_population,
                         clients_per_round=big.real_clients_per_round,
                         withheld_inputs=0 if not model.withheld_inputs else withheld_sum_bound(
                             model.sampling, big.real_population, big.real_clients_per_round))


def server_optimizer(cfg: dict, like: list | None = None):
    """`server-optimizer` over the model's arrays `like` (their shapes; values come each
    step; None: a model built for them).

    None for `sgd`: the mechanism's plain step w + server-lr * mean, which equals
    torch.optim.SGD bit for bit (tests/strategy/test_server_optimizer.py). Taking it
    without torch.optim keeps torch._dynamo, which any torch.optim optimizer imports
    on its first call (3 s of imports on 2 cores), off the start of every run.
    """
    if cfg["server-optimizer"] == "sgd":
        return None
    from dpfl_app.config import model_spec
    from dpfl_app.strategy.server_optimizer import ServerOptimizer
    from dpfl_app.task import build_model

    if like is None:
        like = [v.numpy() for v in build_model(*model_spec(cfg)).state_dict().values()]
    return ServerOptimizer(cfg["server-optimizer"], like, cfg["server-lr"],
                           cfg["server-momentum"])


def audit_canaries(cfg: dict, population: int) -> CanaryAudit | None:
    """The privacy audit's canary clients (Andrew et al., ICLR 2024), if asked for."""
    k = cfg["audit-canaries"]
    if k == 0:
        return None
    from dpfl_app.privacy.audit import population_warning
    from dpfl_app.strategy.canaries import CanaryAudit, canary_seed

    rate = cfg["clients"] / population
    log(INFO, "audit-canaries=%d: the server adds %d canary clients, sampled like real ones "
        "(rate %.3g), and estimates epsilon from this run (Andrew et al., ICLR 2024). Canaries "
        "change the model a little: each sampled one adds C_t times a random unit direction to "
        "the sum. The accounted epsilon of the real clients is unchanged.", k, k, rate)
    warning = population_warning(k, population, rate)
    if warning:
        log(WARNING, "%s", warning)
    seed = canary_seed(cfg["seed"] if cfg["deterministic-noise"] else None)
    return CanaryAudit(k, seed, cfg["sampling"], rate)

