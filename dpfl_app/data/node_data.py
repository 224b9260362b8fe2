"""A SuperNode's own data (`data-path`), the real-world alternative to demo partitions.

In a real federation each site keeps its data on its own machine. The site's
operator points its SuperNode at it, and the user runs with `node-data='local'`:

    flower-supernode ... --node-config 'data-path="/srv/dpfl/site-data"'
    flwr run . remote --run-config "node-data='local'"

`data-path` is a folder of parquet files (or one .parquet file) holding this
site's training examples in the schema of the run's `dataset`: the image column
(`image`; `img` for cifar10; or `image-column`) and an integer label column
(`label`, or `label-column`) in [0, number of classes). Images are either
encoded images as `datasets` writes them (PNG/JPEG bytes) or arrays of pixels
(digits: 8x8 floats in [0, 16]). The folder is read like `hf download
--local-dir` output: files named train*.parquet (or in a train/ folder) are the
train split, other split names are ignored; with no split names at all, every
file is training data. With client-eval on, the site keeps 20% of it for its
local validation, as with the demo partitions; with it off, all of it trains. `dpfl export-data` writes a
demo partition in this format.
"""

from __future__ import annotations

import functools
from pathlib import Path

from dpfl_app.data.settings import ClientSettings
from dpfl_app.errors import ConfigError
# data.py's private helpers are reused, not copied: the same column check,
# image decoding, offline switch and demo partitions as the Hub datasets.
from dpfl_app.data.datasets import (
    DatasetSpec, Tensors, _decode_images, _go_offline, _partitioned, describe, split_for_client,
)
# The demo partition, from the disk cache when a cold process has made it before.
from dpfl_app.data.partition_cache import load_client_data

FORMAT = ("a folder of parquet files (train*.parquet), or one .parquet file, with "
          "columns {image!r} (images) and {label!r} (integer labels in [0, {classes}))")


def _fail(data_path: str, problem: str, spec: DatasetSpec) -> ConfigError:
    expected = FORMAT.format(image=spec.image_column, label=spec.label_column,
                             classes=spec.num_classes)
    return ConfigError(f"node config 'data-path' = {data_path!r} {problem}; expected {expected}")


def _read_train_split(data_path: str, spec: DatasetSpec):
    """The train split of the site's files, images decoded, columns checked."""
    from datasets import load_dataset

    path = Path(data_path).expanduser()
    if not path.is_absolute():  # the SuperNode's working directory is not the user's
        raise _fail(data_path, "is not an absolute path", spec)
    if not path.exists():
        raise _fail(data_path, "does not exist", spec)
    _go_offline()  # local files only: never look the path up on the Hub
    if path.is_file():
        if path.suffix != ".parquet":
            raise _fail(data_path, "is a file but not a .parquet file", spec)
        source = {"path": "parquet", "data_files": {"train": str(path)}}
    elif not any(path.rglob("*.parquet")):
        raise _fail(data_path, "holds no .parquet file", spec)
    else:
        source = {"path": str(path)}
    splits = load_dataset(**source)
    if "train" not in splits:
        raise _fail(data_path, f"has no train split (found: {', '.join(splits)})", spec)
    columns = splits["train"].column_names
    for column in (spec.image_column, spec.label_column):
        if column not in columns:
            raise _fail(data_path, f"has no column {column!r} (columns: "
                        f"{', '.join(columns)})", spec)
    return _decode_images(spec)(splits)["train"]


@functools.lru_cache(maxsize=2)
def load_node_data(data_path: str, spec: DatasetSpec, seed: int = 42,
                   val_fraction: float = 0.0) -> tuple[Tensors, Tensors]:
    """This site's (train, validation) tensors from the files at `data_path`."""
    train = _read_train_split(data_path, spec)
    if len(train) < 2:
        raise _fail(data_path, f"has {len(train)} example(s), fewer than 2", spec)
    labels = set(train[spec.label_column])
    bad = sorted(label for label in labels
                 if not isinstance(label, int) or not 0 <= label < spec.num_classes)
    if bad:
        raise _fail(data_path, f"has labels outside [0, {spec.num_classes}): {bad[:5]}", spec)
    return split_for_client(train, spec, seed, val_fraction)


def client_data(settings: ClientSettings) -> tuple[Tensors, Tensors]:
    """A ClientApp's (train, validation) tensors: its site's files or its demo partition."""
    if settings.data_path:
        spec = describe(settings.dataset, settings.data_dir, settings.image_column,
                        settings.label_column)
        return load_node_data(settings.data_path, spec, settings.seed, settings.val_fraction)
    return load_client_data(
        settings.dataset, settings.partition_id, settings.num_partitions,
        settings.partitioning, settings.dirichlet_alpha, settings.seed,
        settings.data_dir, settings.image_column, settings.label_column,
        settings.val_fraction,
    )


def export_partition(out_dir: Path, name: str, partition_id: int, num_partitions: int,
                     partitioning: str = "iid", alpha: float = 0.5, seed: int = 42,
                     data_dir: str = "") -> Path:
    """Write a demo partition as a site's `data-path` folder (out_dir/train.parquet)."""
    partitioner, _ = _partitioned(name, data_dir, "", "", partitioning, num_partitions,
                                  alpha, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    partitioner.load_partition(partition_id).to_parquet(str(out_dir / "train.parquet"))
    return out_dir
