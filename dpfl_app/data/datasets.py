"""Datasets: one registry, flwr-datasets partitioners, tensors cached per process.

The default, `digits`, is scikit-learn's `load_digits` (1,797 real 8x8
handwritten digits shipped inside the package), so `flwr run .` needs no
download. Every other dataset goes through flwr-datasets' `FederatedDataset`:
from the Hugging Face Hub, or from a local copy (`data-dir`) with no network.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from dpfl_app.data.memory_cache import PARTITIONS
from dpfl_app.errors import DataUnavailable
from dpfl_app.data.registry import (  # noqa: F401  (DATASETS, DatasetSpec: re-export)
    COLOUR, DATASETS, GREY, GREY_MODES, DatasetSpec, get_spec,
)

PARTITIONINGS = ("iid", "dirichlet", "shard")
# The server's held-out test set for `digits`, which has no official split.
DIGITS_TEST_FRACTION = 0.2
# With client-eval on, each client keeps this fraction of its partition for
# local validation. With it off (the default) nothing reads a validation split,
# so clients train on all their data (val_fraction=0).
CLIENT_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Tensors:
    """A dataset as two tensors, ready for a TensorDataset."""

    images: "torch.Tensor"  # noqa: F821  float32, N x C x H x W, normalised
    labels: "torch.Tensor"  # noqa: F821  int64, N


@functools.lru_cache(maxsize=4)
def describe(name: str, data_dir: str = "", image_column: str = "",
             label_column: str = "") -> DatasetSpec:
    """`get_spec`, completed from the data (model, shape, classes) outside the registry."""
    spec = get_spec(name, image_column, label_column)
    if name in DATASETS:
        return spec
    # seed 42, the default: the server's `load_test_data` then reuses this load
    _, test = _partitioned(name, data_dir, image_column, label_column, "iid", 1, 0.5, 42)
    label = test.features[spec.label_column]
    num_classes = getattr(label, "num_classes", None) or int(max(test[spec.label_column])) + 1
    grey = test[0][spec.image_column].mode in GREY_MODES
    return dataclasses.replace(spec, num_classes=num_classes, **(GREY if grey else COLOUR))


def to_tensors(columns: dict, spec: DatasetSpec) -> Tensors:
    """Stack an image column (PIL images or arrays) into a normalised tensor."""
    import torch

    channels, height, width = spec.shape

    def pixels(image) -> np.ndarray:
        if hasattr(image, "convert"):  # PIL: match the model's channels and size
            mode = "L" if channels == 1 else "RGB"
            image = image if image.mode == mode else image.convert(mode)
            if image.size != (width, height):
                image = image.resize((width, height))
        return np.asarray(image, dtype=np.float32)

    images = np.stack([pixels(im) for im in columns[spec.image_column]])
    if images.ndim == 3:  # N x H x W: grey
        images = images[:, None]
    else:  # N x H x W x C
        images = images.transpose(0, 3, 1, 2)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    images = (images / spec.max_value - mean) / std
    labels = np.asarray(columns[spec.label_column], dtype=np.int64)
    return Tensors(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


@functools.lru_cache(maxsize=1)
def _digits_splits(seed: int):
    """digits as a (train, test) pair of `datasets.Dataset`, stratified."""
    from datasets import Dataset
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=DIGITS_TEST_FRACTION,
        stratify=digits.target, random_state=seed,
    )
    as_dataset = lambda x, y: Dataset.from_dict(  # noqa: E731
        {"image": x.astype(np.float32), "label": y.astype(np.int64)}
    )
    return as_dataset(x_train, y_train), as_dataset(x_test, y_test)


def make_partitioner(partitioning: str, num_partitions: int, label_column: str,
                     alpha: float, seed: int):
    """The flwr-datasets partitioner for `partitioning`."""
    from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner,
                                           ShardPartitioner)

    if partitioning == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if partitioning == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by=label_column,
            alpha=alpha, seed=seed, min_partition_size=2, self_balancing=True,
        )
    if partitioning == "shard":
        # FedAvg's pathological non-IID split (McMahan et al. 2017): sort by label,
        # cut 2 * num_partitions equal shards, 2 per client; the remainder is dropped.
        return ShardPartitioner(num_partitions=num_partitions, partition_by=label_column,
                                num_shards_per_partition=2, seed=seed)
    raise ValueError(
        f"partitioning={partitioning!r} is unknown; allowed: {', '.join(PARTITIONINGS)}"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (or HF_ENDPOINT) answers, checked in seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _go_offline() -> None:
    """Make `datasets` use local files only, so a miss fails now, not after retries."""
    import datasets.config
    import huggingface_hub.constants

    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True


def _source(spec: DatasetSpec, data_dir: str) -> dict:
    """FederatedDataset's `dataset=` (and `cache_dir=`) for the Hub or a local copy."""
    if not data_dir:
        return {"dataset": spec.hub_id}
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data-dir={data_dir!r} is not a directory")
    from datasets.naming import camelcase_to_snakecase

    owner, name = spec.hub_id.split("/")
    # A `datasets` cache (~/.cache/huggingface/datasets, or the folder above it).
    for cache in (root, root / "datasets"):
        if (cache / f"{owner}___{camelcase_to_snakecase(name)}").is_dir():
            return {"dataset": spec.hub_id, "cache_dir": str(cache)}
    # A Hub cache (~/.cache/huggingface/hub, or above): the snapshot `main` points at.
    for hub in (root, root / "hub"):
        repo = hub / f"datasets--{owner}--{name}"
        if repo.is_dir():
            ref = repo / "refs" / "main"
            if ref.is_file():
                snapshot = repo / "snapshots" / ref.read_text().strip()
            else:
                snapshot = max((repo / "snapshots").iterdir(), key=os.path.getmtime)
            return {"dataset": str(snapshot)}
    # `hf download --local-dir`: `datasets` finds the splits from the file names.
    return {"dataset": str(root)}


def _offline_help(name: str, spec: DatasetSpec) -> str:
    folder = name.replace("/", "-") + "-data"
    return (
        f"dataset={name!r} needs {spec.hub_id} from the Hugging Face Hub, which this "
        "machine cannot reach (or offline mode is on), and it is not in the local "
        "Hugging Face cache. Either:\n"
        f"  1. on a machine with internet run `hf download {spec.hub_id} --repo-type "
        f"dataset --local-dir {folder}`, copy {folder} here and run with "
        f"--run-config \"data-dir='/absolute/path/to/{folder}'\";\n"
        "  2. or set data-dir to a Hugging Face cache (~/.cache/huggingface) copied "
        "from a machine that has loaded the dataset once;\n"
        "  3. or train on the built-in data: --run-config \"dataset='digits'\""
    )


def _decode_images(spec: DatasetSpec):
    """A FederatedDataset preprocessor: check the columns, decode raw image structs."""
    from datasets import Image

    def preprocess(splits):
        features = splits[next(iter(splits))].features
        for column in (spec.image_column, spec.label_column):
            if column not in features:
                raise ValueError(f"column {column!r} is not in {spec.hub_id} (columns: "
                                 f"{', '.join(features)}); set image-column / label-column")
        feature = features[spec.image_column]
        if isinstance(feature, dict) and "bytes" in feature:  # parquet without HF metadata
            splits = splits.cast_column(spec.image_column, Image())
        return splits

    return preprocess


@functools.lru_cache(maxsize=4)
def _partitioned(name: str, data_dir: str, image_column: str, label_column: str,
                 partitioning: str, num_partitions: int, alpha: float, seed: int):
    """(partitioner over the train split, server test split), cached per process."""
    spec = get_spec(name, image_column, label_column)
    partitioner = make_partitioner(partitioning, num_partitions, spec.label_column, alpha, seed)
    if spec.hub_id is None:
        train, test = _digits_splits(seed)
        partitioner.dataset = train
        return partitioner, test
    import datasets.config

    from flwr_datasets import FederatedDataset

    # A local copy needs no network; without one, an unreachable Hub must fail
    # at once (only a local cache can help) rather than after a minute of retries.
    offline = bool(data_dir) or datasets.config.HF_HUB_OFFLINE or not hub_reachable()
    if offline:
        _go_offline()
    fds = FederatedDataset(partitioners={"train": partitioner}, seed=seed,
                           preprocessor=_decode_images(spec), **_source(spec, data_dir))
    try:
        return fds.partitioners["train"], fds.load_split(spec.test_split)
    except (ConnectionError, FileNotFoundError) as err:  # what `datasets` raises offline
        if not offline:  # e.g. a misspelt Hub id: `datasets` says it best
            raise
        if data_dir:
            raise DataUnavailable(
                f"data-dir={data_dir!r} holds no readable copy of {spec.hub_id}: expected "
                "the folder `hf download --local-dir` writes (parquet files named "
                "train-*/test-*), or a Hugging Face cache that holds it"
            ) from err
        raise DataUnavailable(_offline_help(name, spec)) from err


@PARTITIONS.cached  # bounded by bytes (memory_cache.py), not by a count of partitions
def load_client_data(name: str, partition_id: int, num_partitions: int,
                     partitioning: str = "iid", alpha: float = 0.5, seed: int = 42,
                     data_dir: str = "", image_column: str = "",
                     label_column: str = "", val_fraction: float = 0.0) -> tuple[Tensors, Tensors]:
    """A client's (train, validation) tensors: its partition, `val_fraction` held out."""
    spec = describe(name, data_dir, image_column, label_column)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} must be in [0, {num_partitions})")
    partitioner, _ = _partitioned(name, data_dir, image_column, label_column,
                                  partitioning, num_partitions, alpha, seed)
    if spec.hub_id is None and partitioning == "iid" and val_fraction <= 0:
        # The built-in data set is small: convert its train split once per process and
        # slice each IID shard from it, instead of `load_partition` (about 12 ms each,
        # a large part of a 1,437-client simulation's first round).
        whole = _train_tensors(name, seed)
        start, end = iid_shard_bounds(len(whole.labels), num_partitions)[partition_id]
        train = Tensors(whole.images[start:end].clone(), whole.labels[start:end].clone())
        return train, Tensors(train.images[:0], train.labels[:0])
    return split_for_client(partitioner.load_partition(partition_id), spec, seed, val_fraction)


@functools.lru_cache(maxsize=2)
def _train_tensors(name: str, seed: int) -> Tensors:
    """A built-in data set's whole train split as tensors (the rows the partitioners split)."""
    partitioner, _ = _partitioned(name, "", "", "", "iid", 1, 0.5, seed)
    return to_tensors(partitioner.dataset[:], describe(name))


def split_for_client(rows, spec: DatasetSpec, seed: int,
                     val_fraction: float = 0.0) -> tuple[Tensors, Tensors]:
    """A client's rows (a `datasets.Dataset`) as (train, validation) tensors.

    `val_fraction=0` (client-eval off): every row trains, the validation split is
    empty. Otherwise that fraction is held out, except from a one-row client
    (e.g. digits over 1,000 clients), which trains on its one example.
    """
    if val_fraction <= 0 or len(rows) < 2:
        train = to_tensors(rows[:], spec)
        return train, Tensors(train.images[:0], train.labels[:0])
    split = rows.train_test_split(test_size=val_fraction, seed=seed)
    return to_tensors(split["train"][:], spec), to_tensors(split["test"][:], spec)


@functools.lru_cache(maxsize=2)
def load_test_data(name: str, seed: int = 42, data_dir: str = "", image_column: str = "",
                   label_column: str = "") -> Tensors:
    """The server-only held-out test set: the dataset's own test split."""
    spec = describe(name, data_dir, image_column, label_column)
    _, test = _partitioned(name, data_dir, image_column, label_column, "iid", 1, 0.5, seed)
    return to_tensors(test[:], spec)


def partition_label_counts(name: str, partitioning: str, num_partitions: int,
                           alpha: float = 0.5, seed: int = 42, data_dir: str = "",
                           image_column: str = "", label_column: str = "") -> list[list[int]]:
    """Per-partition label histogram: counts[partition][label] (whole partitions).

    Labels outside [0, num_classes) are not counted. A bincount of the label
    column only: flwr-datasets' compute_counts (pandas per partition) took 3x
    as long, 19 s for 1,000 partitions.
    """
    spec = describe(name, data_dir, image_column, label_column)
    partitioner, _ = _partitioned(name, data_dir, image_column, label_column,
                                  partitioning, num_partitions, alpha, seed)
    if partitioning == "iid":  # contiguous shards: one pass over the label column
        column = np.asarray(partitioner.dataset[spec.label_column], dtype=np.int64)
        parts = [column[start:end] for start, end in iid_shard_bounds(len(column),
                                                                      num_partitions)]
    else:  # each partition loaded once (about 12 ms each with `datasets`)
        parts = [np.asarray(partitioner.load_partition(pid)[spec.label_column], dtype=np.int64)
                 for pid in range(num_partitions)]
    return [np.bincount(labels[(labels >= 0) & (labels < spec.num_classes)],
                        minlength=spec.num_classes).tolist() for labels in parts]


def iid_shard_bounds(rows: int, num_partitions: int) -> list[tuple[int, int]]:
    """[start, end) of each IID partition: flwr-datasets' IidPartitioner takes
    `datasets.Dataset.shard(num_partitions, i, contiguous=True)`, whose
    arithmetic this is (tests/data check it against `load_partition`). Reading
    the label column once instead of loading 1,437 partitions takes the
    ServerApp's partition histogram from 18 s to milliseconds."""
    div, mod = divmod(rows, num_partitions)
    starts = [div * i + min(i, mod) for i in range(num_partitions)]
    return [(start, start + div + (1 if i < mod else 0)) for i, start in enumerate(starts)]


def format_label_histogram(counts: list[list[int]]) -> str:
    """The label histogram as a table, one row per partition, for the log."""
    width = len(str(max(map(max, counts)))) + 2
    head = f"{'client':>6}{'total':>8}" + "".join(f"{k:>{width}}" for k in range(len(counts[0])))
    rows = [f"{i:>6}{sum(row):>8}" + "".join(f"{n:>{width}}" for n in row)
            for i, row in enumerate(counts)]
    return "\n".join([head, *rows])


def loader(tensors: Tensors, batch_size: int, shuffle: bool, seed: int = 0):
    """A DataLoader over cached tensors (cheap to rebuild per message)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(tensors.images, tensors.labels),
                      batch_size=batch_size, shuffle=shuffle, generator=generator)
