"""Deployment cold start: a fresh process per message, as `flwr-clientapp` runs it.

The parent times a child from process start to exit; the child imports the
ClientApp, builds the message a SuperNode would hand it (the global model,
round 1, the clip norm) and calls the app once, exactly as Flower does after
pulling the message. The reference is `python -c "import torch"` on the same
machine: the ClientApp cannot start faster than its model code.

    dpfl coldstart            # print the table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dpfl_app.tools.cli import HelpFormatter

# What a ClientApp message must not import once its partition is cached: each
# costs a second or more in a fresh process (torch._dynamo: via torch.optim).
HEAVY = ("torch._dynamo", "torchvision", "datasets", "flwr_datasets", "sklearn",
         "dp_accounting", "matplotlib", "scipy")


def child(kind: str, partition_id: int, num_partitions: int) -> dict:
    """Handle one `train` or `evaluate` message in this (fresh) process."""
    start = time.perf_counter()
    from dpfl_app.client_app import app
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
    from flwr.supercore.task_identity import TaskIdentity

    from dpfl_app.tools.bench import default_run_config
    from dpfl_app.config import model_spec, validate
    from dpfl_app.task import build_model

    imported = time.perf_counter()
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    run_config = default_run_config()
    arrays = ArrayRecord(build_model(*model_spec(validate(dict(run_config)))).state_dict())
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": 1, KEY_CLIPPING_NORM: 0.1})})
    msg = Message(content=content, dst_node_id=1, message_type=kind)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink does
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": partition_id,
                                   "num-partitions": num_partitions})
    reply = app(msg, context)
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    return {"import_s": imported - start, "handle_s": time.perf_counter() - imported,
            "heavy_modules": [name for name in HEAVY if name in sys.modules]}


def child_secagg_share_keys() -> dict:
    """Handle one `query.secagg_share_keys` message (a round's first, k = 16 neighbours,
    its own identity) in this process; the node enrolled earlier (another message, untimed)."""
    start = time.perf_counter()
    from dpfl_app.client_app import app
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from dpfl_app.secagg import RECORD, inprocess, round_keys
    from dpfl_app.secagg.server import ServerRound

    imported = time.perf_counter()
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config={})
    announced = {"dp-clients": 50, "dp-sampling": "poisson", "dp-population": 100,
                 "dp-rounds": 1}

    def call(message_type: str, request: dict) -> dict:
        msg = Message(RecordDict({RECORD: ConfigRecord(request)}), dst_node_id=1,
                      message_type=message_type)
        msg.metadata.__dict__["_message_id"] = msg.object_id
        reply = app(msg, context)
        if reply.has_error():
            raise RuntimeError(reply.error.reason)
        return dict(reply.content[RECORD])

    server, directory = ServerRound(1, 17, 16), round_keys.Directory()
    directory.receive(1, call("query.secagg_enrol", {"round": 1, **announced}))
    for j, peer in inprocess.relayed_identities(17).items():
        if j > 1:
            directory.receive(j, round_keys.enrol({}, {"round": 1, "session": 1, **announced},
                                                  peer)[1])
    for j in server.indices:
        server.add_keys(j, directory.round_keys(j, 1))
    request = {**server.share_keys_request(1), **announced}
    prepared = time.perf_counter()
    call("query.secagg_share_keys", request)
    return {"import_s": imported - start, "handle_s": time.perf_counter() - prepared,
            "heavy_modules": [name for name in HEAVY + ("torch",) if name in sys.modules]}


def _timed(args: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout


def measure(repeats: int = 3, num_partitions: int = 10) -> dict:
    """Median wall seconds: `import torch`, and train/evaluate with a cold and warm cache."""
    env = {**os.environ}
    torch_s = [_timed([sys.executable, "-c", "import torch"], env)[0] for _ in range(repeats)]
    result = {"import_torch_s": statistics.median(torch_s)}
    for kind in ("train", "evaluate"):
        for cache in ("cold", "warm"):
            times, phases = [], []
            for i in range(repeats):
                with tempfile.TemporaryDirectory() as cache_dir:
                    env["DPFL_CACHE_DIR"] = cache_dir
                    command = [sys.executable, "-m", "dpfl_app.tools.bench.coldstart", "--child",
                               kind, "--partition-id", str(i % num_partitions),
                               "--num-partitions", str(num_partitions)]
                    if cache == "warm":  # a previous message filled this node's cache
                        _timed(command, env)
                    seconds, stdout = _timed(command, env)
                times.append(seconds)
                phases.append(json.loads(stdout.strip().splitlines()[-1]))
            result[f"{kind}_{cache}_s"] = statistics.median(times)
            result[f"{kind}_{cache}_import_s"] = statistics.median(p["import_s"] for p in phases)
            result[f"{kind}_{cache}_handle_s"] = statistics.median(p["handle_s"] for p in phases)
    command = [sys.executable, "-m", "dpfl_app.tools.bench.coldstart", "--child",
               "secagg_share_keys"]
    runs = [_timed(command, env) for _ in range(repeats)]
    result["secagg_share_keys_s"] = statistics.median(seconds for seconds, _ in runs)
    phases = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout in runs]
    result["secagg_share_keys_import_s"] = statistics.median(p["import_s"] for p in phases)
    result["secagg_share_keys_handle_s"] = statistics.median(p["handle_s"] for p in phases)
    result["warm_vs_torch"] = max(result["train_warm_s"],
                                  result["evaluate_warm_s"]) / result["import_torch_s"]
    return result


def table(result: dict) -> str:
    torch_s = result["import_torch_s"]
    rows = ["| process | wall s | import s | handle s | x `import torch` |",
            "|---|---:|---:|---:|---:|",
            f"| `python -c \"import torch\"` | {torch_s:.2f} | | | 1.00 |"]
    for kind in ("train", "evaluate"):
        for cache in ("cold", "warm"):
            key = f"{kind}_{cache}"
            rows.append(f"| ClientApp {kind}, {cache} partition cache | {result[key + '_s']:.2f} | "
                        f"{result[key + '_import_s']:.2f} | {result[key + '_handle_s']:.2f} | "
                        f"{result[key + '_s'] / torch_s:.2f} |")
    if "secagg_share_keys_s" in result:
        key = "secagg_share_keys"
        rows.append(f"| ClientApp `query.secagg_share_keys`, k = 16 (no torch) | "
                    f"{result[key + '_s']:.2f} | {result[key + '_import_s']:.2f} | "
                    f"{result[key + '_handle_s']:.2f} | {result[key + '_s'] / torch_s:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpfl coldstart", formatter_class=HelpFormatter)
    parser.add_argument("--child", choices=["train", "evaluate", "secagg_share_keys"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--partition-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--num-partitions", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="cold processes per measurement")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_secagg_share_keys() if args.child == "secagg_share_keys" else
                         child(args.child, args.partition_id, args.num_partitions)))
        return 0
    print(table(measure(args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
