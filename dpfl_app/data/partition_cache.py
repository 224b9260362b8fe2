"""A node's prepared partition on disk, so that a cold process does not re-partition.

In deployment every message starts a fresh `flwr-clientapp` process; in a
simulation with more partitions than an actor's in-memory cache holds
(memory_cache.py), some messages miss it. Without this cache each of them imports `datasets`,
scikit-learn and flwr-datasets and re-runs the partitioner (seconds); with it
they read one small `torch.save` file (milliseconds).

The file name is a hash of everything that changes the tensors, so a changed
setting never reads a stale partition. Location: `$DPFL_CACHE_DIR`, default
`~/.cache/dpfl_app`; `DPFL_CACHE_DIR=off` turns the cache off. A Hub dataset
is keyed by its id: after the Hub copy changes, delete the cache folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

from dpfl_app.data import datasets as data
from dpfl_app.data.memory_cache import PARTITIONS
from dpfl_app.data.registry import get_spec

CACHE_ENV = "DPFL_CACHE_DIR"
# Bump when the code that turns a partition into tensors changes its output.
FORMAT_VERSION = 1


def cache_dir() -> Path | None:
    """The cache folder, or None when `DPFL_CACHE_DIR=off` (or empty)."""
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return Path.home() / ".cache" / "dpfl_app"
    return None if value.strip().lower() in ("", "off", "0", "false") else Path(value).expanduser()


def _fingerprint(data_dir: str) -> list:
    """Names, sizes and mtimes of a local copy's files: a replaced file changes the key."""
    if not data_dir:
        return []
    root = Path(data_dir).expanduser().resolve()
    return sorted([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns]
                  for path in root.rglob("*") if path.is_file() and (stat := path.stat()))


def cache_key(name: str, partition_id: int, num_partitions: int, partitioning: str,
              alpha: float, seed: int, data_dir: str, image_column: str,
              label_column: str, val_fraction: float) -> str:
    """A hash of every input of `data.load_client_data`, and of the constants it uses."""
    spec = get_spec(name, image_column, label_column)
    params = {
        "version": FORMAT_VERSION, "dataset": name, "partition_id": partition_id,
        "num_partitions": num_partitions, "partitioning": partitioning, "alpha": alpha,
        "seed": seed, "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir else "",
        "files": _fingerprint(data_dir), "spec": dataclasses.asdict(spec),
        "val_fraction": val_fraction, "test_fraction": data.DIGITS_TEST_FRACTION,
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]


def _save(path: Path, tensors: dict) -> None:
    """Write atomically under a unique temporary name: nodes may fill one key at once."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(tensors, out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@PARTITIONS.cached  # in memory first, within a byte budget (memory_cache.py)
def load_client_data(name: str, partition_id: int, num_partitions: int,
                     partitioning: str = "iid", alpha: float = 0.5, seed: int = 42,
                     data_dir: str = "", image_column: str = "", label_column: str = "",
                     val_fraction: float = 0.0) -> tuple[data.Tensors, data.Tensors]:
    """`data.load_client_data`, served from the disk cache when it holds the partition."""
    args = (name, partition_id, num_partitions, partitioning, alpha, seed, data_dir,
            image_column, label_column, val_fraction)
    folder = cache_dir()
    if folder is None:
        return data.load_client_data(*args)
    import torch

    path = folder / f"{name.replace('/', '--')}-{cache_key(*args)}.pt"
    try:
        saved = torch.load(path, weights_only=True)
        return data.Tensors(*saved["train"]), data.Tensors(*saved["val"])
    except Exception:  # noqa: BLE001  absent or unreadable: a cache never fails a run
        pass
    train, val = data.load_client_data(*args)
    try:
        _save(path, {"train": (train.images, train.labels), "val": (val.images, val.labels)})
    except OSError:  # a read-only home must not stop training
        pass
    return train, val
