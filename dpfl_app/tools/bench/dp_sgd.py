"""Opacus or torch.func for each site's DP-SGD: one cold ClientApp-like process each, interleaved.

    python -m dpfl_app.tools.bench.dp_sgd [--reps 3] [--model digits-linear]

Each child process does what a deployed ClientApp does on a train message
with record-level DP: import torch and the DP-SGD code, build the model, and
train one round on one digits site (144 records, Poisson rate 0.1, 5 local
epochs = 50 steps, clip 1, sigma 1). `torch.func` is the app's path
(`dpfl_app.client.dp_sgd`); `opacus` is Opacus 1.6's PrivacyEngine.make_private
(GradSampleModule, DPOptimizer, DPDataLoader with Poisson sampling) with
torch.optim.SGD(momentum=0.9). The two run alternately (A B A B ...), so
that a busy machine slows both alike; the table gives medians, their ratio,
and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import numpy as np, torch
torch.set_num_threads(1)
from dpfl_app.task import build_model
from dpfl_app.data.node_data import client_data
from dpfl_app.config import client_settings
from types import SimpleNamespace
from dpfl_app.tools.bench import default_run_config
path, model_name = sys.argv[1], sys.argv[2]
if path == "opacus":
    from opacus import PrivacyEngine
else:
    from dpfl_app.client.dp_sgd import DpSgdSettings, train_dp_sgd
    from dpfl_app.privacy.randomness import secure_generator
imported = time.perf_counter()
data = client_data(client_settings(SimpleNamespace(run_config=default_run_config(),
    node_config={"partition-id": 0, "num-partitions": 10})))[0]
net = build_model(model_name)
loaded = time.perf_counter()
if path == "opacus":
    from torch.utils.data import DataLoader, TensorDataset
    loader = DataLoader(TensorDataset(data.images, data.labels), batch_size=14)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    for _ in range(5):
        for images, labels in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
else:
    train_dp_sgd(net, data, DpSgdSettings(1.0, 1.0, 0.1, 5, 0.05, 14), secure_generator(), "cpu")
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "train_s": done - loaded, "total_s": done - start}))
"""


def run_child(path: str, model: str, root: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, path, model], cwd=root, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - start
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", default="digits-linear")
    args = parser.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    rows: dict[str, list[dict]] = {"torch.func": [], "opacus": []}
    load_before = os.getloadavg()[0]
    for _ in range(args.reps):
        for path in rows:
            rows[path].append(run_child(path, args.model, root))
    print(f"model {args.model}, {args.reps} interleaved runs each, load average "
          f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'seconds (median)':<18}" + "".join(f"{p:>12}" for p in rows) + f"{'ratio':>8}")
    for key in ("import_s", "train_s", "process_s"):
        med = [statistics.median(r[key] for r in rows[p]) for p in rows]
        print(f"{key:<18}" + "".join(f"{m:>12.2f}" for m in med) + f"{med[1] / med[0]:>8.2f}")


if __name__ == "__main__":
    main()
