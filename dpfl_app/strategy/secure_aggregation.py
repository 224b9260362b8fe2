"""DP-FedAvg whose clipped sum comes from SecAgg+ instead of plain replies.

Each round (Bell et al. 2020; Bonawitz et al. 2017):

0. Enrolment, not per round: in the first round every online node, later any
   sampled node without committed keys for the round (with them, every online
   node still without), gets `query.secagg_enrol` and replies with its signed
   public keys for a window of rounds (`secagg.round_keys`); the server keeps
   them in a `round_keys.Directory`. In steady state no round has this exchange.
1. `configure_train` samples the cohort as `DPFedAvgAdaptive` does, keeps the
   nodes with committed keys for the round, then runs `query.secagg_share_keys`
   (the round parameters, the announced mechanism and the neighbours' committed
   keys; encrypted shares back, routed by the server), and returns `train.secagg`
   messages carrying each client's shares.
2. The clients train, clip (Flower's `adaptiveclipping_mod`), encode and mask.
3. `clipped_sum` collects the masked vectors, runs `query.secagg_consistency`
   (each survivor signs the survivor set; the one message exchange the
   actively secure variant adds) and `query.secagg_unmask` (each client checks
   its neighbours' signatures on that same set before it sends any share), and
   decodes the sum of the survivors' clipped deltas and norm bits. The base
   class then adds exactly the same noise and divides by the same fixed m as
   without secure aggregation; the ledger charges each round with the largest
   sum it could withhold (`AccountingModel.withheld_inputs`; docs/secure-aggregation.md).

When the cohort is below `min_cohort` (the clients' neighbour floor,
`dpfl_app.secagg.floors`), or fewer than `ServerRound.min_survivors` survive, or a needed secret cannot be rebuilt,
the sum is withheld: the round has no contributors (noise only, never a
partial sum). What the protocol saw (how many clients shared keys, masked an
input and survived; which nodes refused or failed, and why) are exact
participation counts: they go only to the operator's diagnostics, like the
plain path's reply counts, never to the run's log. Whether a round's sum was
withheld depends on the number of survivors, so it is not logged either.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from dpfl_app.secagg import CIPHERTEXTS, RECORD, ROUND, SRC, floors, quantize, round_keys
from dpfl_app.secagg.server import ServerRound
from dpfl_app.strategy.dp_fedavg import ClippedSum, DPFedAvgAdaptive


class SecureDPFedAvgAdaptive(DPFedAvgAdaptive):
    """`DPFedAvgAdaptive` with the sum computed by SecAgg+ over the Message API."""

    def __init__(self, *args, neighbours: int = 0, stage_timeout: float = 600.0,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.neighbours = neighbours
        self.stage_timeout = stage_timeout
        # Withholding rules (dpfl_app.secagg.floors): a cohort below min_cohort, or fewer
        # survivors than ServerRound.min_survivors, releases noise only. min_cohort follows
        # the announced m, so configure_train sets it again from the announcement.
        self.min_cohort = floors.min_cohort(self.num_sampled_clients)
        self._grid: Grid | None = None
        self._round: ServerRound | None = None
        self._nodes: dict[int, int] = {}  # secagg index -> node id
        self._lost: set[int] = set()  # indices that failed a stage they were asked for
        self._refusals: list[dict] = []  # operator-only: {"node_id", "reason"} per refusal
        self._train_sent = 0.0  # when the train messages left (stage_seconds)
        self._directory = round_keys.Directory()  # the nodes' committed round keys

    def __repr__(self) -> str:
        return super().__repr__() + ", SecAgg+ secure aggregation"

    # --- messaging ------------------------------------------------------------
    def _exchange(self, stage: str, requests: dict[int, dict], round_id: int,
                  nodes: dict[int, int] | None = None) -> dict[int, dict]:
        """Send `query.<stage>` to each index; the valid replies by index (others: dropouts).
        `nodes` maps index -> node id (default: the round's cohort)."""
        assert self._grid is not None
        nodes = self._nodes if nodes is None else nodes
        messages = [Message(RecordDict({RECORD: ConfigRecord(request)}), nodes[index],
                            f"query.{stage}", group_id=str(round_id))
                    for index, request in requests.items()]
        by_node = {node: index for index, node in nodes.items()}
        answers = {}
        started = time.perf_counter()
        replies = self._grid.send_and_receive(messages, timeout=self.stage_timeout)
        self._stage_seconds(stage, time.perf_counter() - started)
        for reply in replies:
            index = by_node.get(reply.metadata.src_node_id)
            if index is None or index in answers:
                continue
            if reply.has_error():
                self._refuse(reply.metadata.src_node_id, f"{stage}: {reply.error.reason}")
            elif RECORD in reply.content.config_records:
                answers[index] = dict(reply.content.config_records[RECORD])
        if nodes is self._nodes:
            self._lost |= set(requests) - set(answers)
        return answers

    def _stage_seconds(self, stage: str, seconds: float) -> None:
        """Operator diagnostics: the wall time of each exchange (where a round's time goes)."""
        diag = self._round_diagnostics.setdefault("secure_aggregation", {})
        diag.setdefault("stage_seconds", {})[stage] = round(seconds, 4)

    def _refuse(self, node_id: int, reason: str) -> None:
        self._refusals.append({"node_id": node_id, "reason": f"secure aggregation {reason}"})

    def _note(self, **counts) -> None:
        """Exact protocol counts for this round's operator diagnostics (never logged)."""
        self._round_diagnostics.setdefault("secure_aggregation", {}).update(counts)

    # --- enrolment ---------------------------------------------------------------
    def _enrol(self, round_id: int, cohort: list[int], announced: dict) -> None:
        """Enrol the cohort's nodes without committed keys for this round (with them, every
        online node still without; in the first round, every online node): one exchange,
        and none in a round where every sampled node has its keys."""
        assert self._grid is not None
        missing = [node for node in cohort if not self._directory.has(node, round_id)]
        if not missing and self._directory.names:
            return
        online = [node for node in self._grid.get_node_ids()
                  if not self._directory.has(node, round_id)]
        targets = dict(enumerate(sorted(set(missing) | set(online)), start=1))
        request = {"round": round_id, **announced}
        for index, reply in self._exchange("secagg_enrol", {i: request for i in targets},
                                           round_id, nodes=targets).items():
            self._directory.receive(targets[index], reply)
        self._directory.prune(round_id)

    # --- share keys and the masked input ----------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid):
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        self._grid, self._lost, self._refusals = grid, set(), []
        round_id = self.round_offset + server_round
        announced = {k: v for k, v in config.items() if k.startswith("dp-")}
        # The withholding rule for cohorts: below it every client would refuse its floor.
        self.min_cohort = floors.min_cohort(int(config.get("dp-clients",
                                                           self.num_sampled_clients)))
        cohort = []
        if len(sampled) >= self.min_cohort:  # else no message at all, not even an enrolment
            self._enrol(round_id, [msg.metadata.dst_node_id for msg in sampled], announced)
            # A sampled node without committed keys (its enrolment failed) is a dropout.
            cohort = [msg for msg in sampled
                      if self._directory.has(msg.metadata.dst_node_id, round_id)]
            # Counted as lost under indices past the cohort's, which no message uses (only
            # the number of lost indices is ever read).
            self._lost = set(range(len(cohort) + 1, len(sampled) + 1))
        self._nodes = {i + 1: msg.metadata.dst_node_id for i, msg in enumerate(cohort)}
        if len(cohort) < self.min_cohort:  # noise only
            self._note(cohort=len(sampled), sum_released=False,
                       why=f"a cohort of fewer than {self.min_cohort} is below the clients' "
                           "floors")
            self._round = None
            return []
        rnd = self._round = ServerRound(round_id, len(cohort), self.neighbours)
        for index, node in self._nodes.items():
            rnd.add_keys(index, self._directory.round_keys(node, round_id))
        quantize.check_no_wrap(len(cohort))
        for index, reply in self._exchange("secagg_share_keys", {
                i: {**rnd.share_keys_request(i), **announced} for i in rnd.indices},
                round_id).items():
            rnd.receive_share_keys(index, reply)
        for refusal in self._refusals:  # a node that lost its keys is enrolled again
            if round_keys.NOT_ENROLLED in refusal["reason"]:
                self._directory.forget(refusal["node_id"])
        self._note(cohort=len(sampled), shared_keys=len(rnd.shared),
                   neighbours=len(next(iter(rnd.neighbours.values()))),
                   threshold=rnd.threshold)
        train = []
        for msg in cohort:
            index = next(i for i, node in self._nodes.items() if node == msg.metadata.dst_node_id)
            if index not in rnd.shared:
                continue
            shares = rnd.shares_for(index)
            own = ConfigRecord({**msg.content["config"], ROUND: rnd.round_id,
                                SRC: shares["src"], CIPHERTEXTS: shares["ciphertexts"]})
            content = RecordDict({"arrays": msg.content["arrays"], "config": own})
            train.append(Message(content, msg.metadata.dst_node_id, "train.secagg",
                                 group_id=str(rnd.round_id)))
        self._lost |= set(self._nodes) - set(rnd.shared)
        self._train_sent = time.perf_counter()
        return train

    # --- consistency and unmasking ---------------------------------------------------
    def clipped_sum(self, replies: list[Message], reference: dict[str, np.ndarray],
                    clip: float) -> ClippedSum:
        """The unmasked sum of the survivors' clipped deltas and bits, or nothing."""
        rnd = self._round
        if rnd is None:
            return ClippedSum([], 0, 0, len(self._lost), self._refusals, released=False)
        self._stage_seconds("train.secagg", time.perf_counter() - self._train_sent)
        dim = sum(a.size for a in reference.values())
        by_node = {node: index for index, node in self._nodes.items()}
        for reply in replies:
            index = by_node.get(reply.metadata.src_node_id)
            if reply.has_error():
                self._refuse(reply.metadata.src_node_id, f"train: {reply.error.reason}")
                continue
            record = reply.content.array_records.get(RECORD)
            vector = self.read_input(record["masked"].numpy(), dim) \
                if record is not None and "masked" in record else None
            if index is None or vector is None:
                self._refuse(reply.metadata.src_node_id, "train: malformed masked input")
                continue
            rnd.receive_input(index, vector)
        self._lost |= set(rnd.shared) - set(rnd.inputs)
        for index, reply in self._exchange("secagg_consistency", {
                i: rnd.consistency_request(i) for i in sorted(rnd.inputs)},
                rnd.round_id).items():
            rnd.receive_consistency(index, reply)
        for index, reply in self._exchange("secagg_unmask", {
                i: rnd.unmask_request(i) for i in sorted(rnd.signatures)},
                rnd.round_id).items():
            rnd.receive_unmask(index, reply)
        total = rnd.unmasked_sum()
        self._note(masked_inputs=len(rnd.inputs), min_survivors=rnd.min_survivors,
                   sum_released=total is not None, dropouts=len(self._lost))
        if total is None:  # too few survivors, or secrets not recoverable: noise only
            return ClippedSum([], 0, 0, len(self._lost), self._refusals, released=False)
        flat, unclipped = self.decode(total, clip, dim, len(rnd.inputs))
        sizes = np.cumsum([a.size for a in reference.values()])[:-1]
        deltas = [part.reshape(ref.shape)
                  for part, ref in zip(np.split(flat, sizes), reference.values())]
        return ClippedSum([deltas], unclipped, len(rnd.inputs), len(self._lost),
                          self._refusals)

    # --- the encoding (noise-at=clients overrides these: strategy/client_noise.py) ------
    def read_input(self, vector: np.ndarray, dim: int) -> np.ndarray | None:
        """A masked input of the expected shape and type (the d fixed-point words and the
        bit), or None (malformed)."""
        return vector if vector.shape == (dim + 1,) and vector.dtype == np.uint64 else None

    def decode(self, total: np.ndarray, clip: float, dim: int, survivors: int):
        """The unmasked sum -> (flat sum of the clipped deltas, sum of the norm bits)."""
        return quantize.decode_sum(total, clip)
