"""Accountants that interpret dpfl_app's round events (no Flower imports).

`CachedRdpAccountant` is dp_accounting's RDP accountant with per-event RDP
vectors cached, and, under replace-one adjacency, the order-wise minimum of
two valid bounds for a without-replacement Gaussian round: Wang et al.'s
amplified bound and the plain Gaussian bound, which holds under any sampling
(Renyi divergence is jointly quasi-convex). For large m/N the amplified bound
is looser than no amplification at all.

`PoissonPldAccountant` is dp_accounting's PLD accountant with a discretisation
interval set from the RDP bound of the same events, max(1e-3, eps_rdp / 2000),
and returns min(PLD, RDP); both are upper bounds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation, PrivacyAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

RDP_ORDERS = tuple(DEFAULT_RDP_ORDERS)
PLD_MIN_DISCRETIZATION = 1e-3
PLD_MAX_RDP_EPSILON = 10_000.0


@contextlib.contextmanager
def quiet_absl():
    """Drop dp_accounting's 'failed to converge ... Excluding this order' noise.

    absl also calls `logging.basicConfig()` on its first message when the root
    logger has no handler, which would print every Flower log line twice; a
    NullHandler on the root for the duration prevents that.
    """
    logger = logging.getLogger("absl")
    flt = lambda rec: "failed to converge" not in rec.getMessage()  # noqa: E731
    guard = logging.NullHandler()
    logger.addFilter(flt)
    logging.root.addHandler(guard)
    try:
        yield
    finally:
        logging.root.removeHandler(guard)
        logger.removeFilter(flt)


@functools.lru_cache(maxsize=1024)
def _leaf_rdp(event: dp_accounting.DpEvent, relation: NeighboringRelation) -> tuple:
    """Per-order RDP of one occurrence of a non-composite event (cached: events are hashable).

    A without-replacement Gaussian under replace-one gets min(Wang et al. bound,
    unamplified Gaussian bound) per order; anything else is dp_accounting's RDP value.
    """
    fresh = lambda: RdpAccountant(RDP_ORDERS, relation)  # noqa: E731
    with quiet_absl():
        if (isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent)
                and isinstance(event.event, dp_accounting.GaussianDpEvent)
                and relation == NeighboringRelation.REPLACE_ONE):
            if event.event.noise_multiplier == 0:  # dp_accounting divides by zero here
                return (math.inf,) * len(RDP_ORDERS)
            plain = fresh().compose(event.event).rdp
            if event.sample_size >= event.source_dataset_size:
                return tuple(plain)
            return tuple(np.minimum(fresh().compose(event).rdp, plain))
        return tuple(fresh().compose(event).rdp)


class CachedRdpAccountant(PrivacyAccountant):
    """RDP accountant over RDP_ORDERS that caches per-event RDP vectors.

    Under REPLACE_ONE, each without-replacement Gaussian round is bounded by
    min(Wang et al. bound, unamplified Gaussian bound), order by order. Every
    other event gets dp_accounting's RdpAccountant value unchanged.
    """

    def __init__(self, neighboring_relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE):
        super().__init__(neighboring_relation)
        self._rdp = np.zeros(len(RDP_ORDERS))

    def _maybe_compose(self, event, count, do_compose):
        if isinstance(event, dp_accounting.SelfComposedDpEvent):
            return self._maybe_compose(event.event, event.count * count, do_compose)
        if isinstance(event, dp_accounting.ComposedDpEvent):
            for e in event.events:
                err = self._maybe_compose(e, count, do_compose)
                if err is not None:
                    return err
            return None
        err = RdpAccountant(RDP_ORDERS, self.neighboring_relation)._maybe_compose(event, count, False)
        if err is None and do_compose and count:
            self._rdp = self._rdp + count * np.array(_leaf_rdp(event, self.neighboring_relation))
        return err

    def get_epsilon(self, target_delta: float) -> float:
        return float(compute_epsilon(RDP_ORDERS, self._rdp, target_delta)[0])


class PoissonPldAccountant(PrivacyAccountant):
    """PLD accountant (add-or-remove-one) whose discretisation interval is set from
    the RDP bound of the same events: max(1e-3, eps_rdp / 2000). Returns
    min(PLD, RDP); both are upper bounds. Above eps_rdp = 10_000 it returns the
    RDP bound without building the PLD. epsilon_after and calibration both use
    this class, so a calibrated parameter meets the target under epsilon_after too.
    """

    def __init__(self):
        super().__init__(NeighboringRelation.ADD_OR_REMOVE_ONE)
        self._rdp = CachedRdpAccountant()
        self._events: list = []

    def _maybe_compose(self, event, count, do_compose):
        err = PLDAccountant()._maybe_compose(event, count, False)
        if err is None:
            err = self._rdp._maybe_compose(event, count, False)
        if err is None and do_compose:
            self._rdp.compose(event, count)
            self._events.append((event, count))
        return err

    def get_epsilon(self, target_delta: float) -> float:
        eps_rdp = self._rdp.get_epsilon(target_delta)
        if not math.isfinite(eps_rdp) or eps_rdp > PLD_MAX_RDP_EPSILON:
            return eps_rdp
        pld = PLDAccountant(value_discretization_interval=max(PLD_MIN_DISCRETIZATION, eps_rdp / 2000))
        for event, count in self._events:
            pld.compose(event, count)
        return float(min(pld.get_epsilon(target_delta), eps_rdp))
