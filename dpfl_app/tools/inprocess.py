"""Run the real ServerApp `main` against the real ClientApp in one process.

Used by the tests (tests/inprocess.py) and by `dpfl audit`.

`InProcessGrid` delivers each message by calling the ClientApp directly, the
way a SuperNode would, so the full server logic (validation, strategy,
accounting, outputs, checkpoints) runs in seconds and without a SuperLink.
It can also "crash" the server after a given round, to test resume.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from dpfl_app.client_app import app as client_app
from dpfl_app.server_app import main as server_main

TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class ServerCrash(Exception):
    """Stands for the ServerApp process dying."""


class InProcessGrid:
    """Enough of `flwr.serverapp.Grid` to run `main`: N nodes, replies computed inline."""

    def __init__(self, run_config: dict, num_nodes: int = 10,
                 crash_after_train_round: int | None = None,
                 drop_nodes: set[int] = frozenset(),
                 drop_at: dict[str, set[int]] | None = None,
                 node_config: dict[int, dict] | None = None) -> None:
        self.run_config = run_config
        self.nodes = list(range(1, num_nodes + 1))
        self.crash_after = crash_after_train_round
        self.drop_nodes = set(drop_nodes)
        self.drop_at = drop_at or {}  # message type -> nodes that vanish on that message
        self.extra_node_config = node_config or {}
        self.states = {node: RecordDict() for node in self.nodes}  # context.state, kept per node
        self.sent: list[Message] = []
        self.train_rounds = 0

    def get_node_ids(self):
        return list(self.nodes)

    def context(self, node_id: int) -> Context:
        node_config = {"partition-id": node_id - 1, "num-partitions": len(self.nodes),
                       **self.extra_node_config.get(node_id, {})}
        return Context(run_id=1, node_id=node_id, node_config=node_config,
                       state=self.states[node_id], run_config=self.run_config)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            self.train_rounds += 1
            if self.crash_after is not None and self.train_rounds > self.crash_after:
                raise ServerCrash(f"server died before round {self.train_rounds}")
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.drop_nodes | self.drop_at.get(msg.metadata.message_type, set()):
                continue
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink would
            reply: Message = client_app(msg, self.context(node))
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def run_server(run_config: dict, **grid_kwargs) -> InProcessGrid:
    """Run the ServerApp's `main` once; returns the grid (for its counters)."""
    grid = InProcessGrid(run_config, **grid_kwargs)
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                              run_config=run_config))
    return grid
