"""Datasets, partitioning, local copies, offline failure, models and the baseline.

The Hub is not reachable from CI, so every hub dataset is tested on small
synthetic copies in its real schema (PNG bytes in an `Image` struct, int or
ClassLabel labels) and in the folder layouts `hf download` and the Hugging Face
caches produce, loaded through the real flwr-datasets path via `data-dir`.
Pixels encode the label, the split and the channel, so a test can tell that
images, labels and splits stayed aligned through loading and normalisation.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from dpfl_app.data import datasets as data
from dpfl_app.run import plots
from dpfl_app.data.datasets import DATASETS
from dpfl_app.task import MODELS, build_model

PROJECT = Path(__file__).resolve().parents[2]
# 212 train examples: 1, 2 and 3 shards per client give 53, 52 and 51 examples
N_TRAIN, N_TEST, NUM_PARTITIONS = 212, 50, 4
TRAIN_OFFSET, TEST_OFFSET = 0, 7  # added to every pixel: which split an image came from
# dataset -> (config folder `hf download` writes, image size, PIL mode, write HF metadata)
LAYOUTS = {
    "mnist": ("mnist", 28, "L", True),
    "fashion-mnist": ("fashion_mnist", 28, "L", False),  # bare struct, no HF metadata
    "cifar10": ("plain_text", 32, "RGB", True),
}
MNIST_CARD = """---
dataset_info:
  config_name: mnist
  features:
  - name: image
    dtype: image
  - name: label
    dtype:
      class_label:
        names: {'0': '0', '1': '1', '2': '2', '3': '3', '4': '4', '5': '5', '6': '6', '7': '7', '8': '8', '9': '9'}
configs:
- config_name: mnist
  data_files:
  - split: train
    path: mnist/train-*
  - split: test
    path: mnist/test-*
  default: true
---
# MNIST (synthetic stand-in)
"""


def pixel_value(label, offset, channel=0):
    return 20 * label + offset + 3 * channel


def png(label: int, offset: int, size: int, mode: str) -> bytes:
    from PIL import Image

    channels = 1 if mode == "L" else 3
    pixels = np.stack([np.full((size, size), pixel_value(label, offset, c), np.uint8)
                       for c in range(channels)], axis=-1).squeeze()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(path: Path, labels, offset: int, size: int, mode: str, metadata: bool,
                image_column: str = "image", label_column: str = "label",
                num_classes: int = 10) -> None:
    """One parquet file of a split, as the Hub stores it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import ClassLabel, Dataset, Features, Image

    images = [{"bytes": png(int(y), offset, size, mode), "path": None} for y in labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:  # what `push_to_hub` writes: the HF features ride in the schema
        features = Features({image_column: Image(),
                             label_column: ClassLabel(num_classes=num_classes)})
        Dataset.from_dict({image_column: images, label_column: list(map(int, labels))},
                          features=features).to_parquet(str(path))
    else:
        pq.write_table(pa.table({image_column: images,
                                 label_column: pa.array(labels, pa.int64())}), path)


def balanced_labels(n: int, seed: int, num_classes: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes)


def write_copy(root: Path, name: str) -> Path:
    """A dataset folder as `hf download <id> --repo-type dataset --local-dir root` leaves it."""
    config, size, mode, metadata = LAYOUTS[name]
    image_column = DATASETS[name].image_column
    for split, n, offset, seed in (("train", N_TRAIN, TRAIN_OFFSET, 1),
                                   ("test", N_TEST, TEST_OFFSET, 2)):
        write_split(root / config / f"{split}-00000-of-00001.parquet", balanced_labels(n, seed),
                    offset, size, mode, metadata, image_column)
    download_meta = root / ".cache" / "huggingface" / "download" / config
    download_meta.mkdir(parents=True)
    (download_meta / "train-00000-of-00001.parquet.metadata").write_text("0000\n")
    if name == "mnist":
        (root / "README.md").write_text(MNIST_CARD)
    return root


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("hf-download")
    return {name: str(write_copy(base / name, name)) for name in LAYOUTS}


@pytest.fixture(autouse=True)
def hermetic_hf(monkeypatch, tmp_path_factory):
    """A private `datasets` cache, and HF offline switches restored after each test."""
    import datasets.config
    import huggingface_hub.constants

    cache = tmp_path_factory.getbasetemp() / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE",
                        huggingface_hub.constants.HF_HUB_OFFLINE)
    saved = {var: os.environ.get(var) for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    yield
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


def raw_pixels(tensors: data.Tensors, spec) -> np.ndarray:
    """Undo the normalisation: back to the 0..255 pixel values."""
    mean = np.asarray(spec.mean).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std).reshape(1, -1, 1, 1)
    return (tensors.images.numpy() * std + mean) * spec.max_value


def assert_pixels_encode(tensors: data.Tensors, spec, offset: int) -> None:
    labels = tensors.labels.numpy()
    channels = np.arange(spec.shape[0]).reshape(1, -1, 1, 1)
    expected = pixel_value(labels.reshape(-1, 1, 1, 1), offset, channels)
    np.testing.assert_allclose(raw_pixels(tensors, spec), np.broadcast_to(
        expected, tensors.images.shape), atol=1e-3)


# --- the registry -----------------------------------------------------------

def test_registry_entries_are_complete():
    assert DATASETS["mnist"].hub_id == "ylecun/mnist"
    assert DATASETS["fashion-mnist"].hub_id == "zalando-datasets/fashion_mnist"
    assert DATASETS["cifar10"].hub_id == "uoft-cs/cifar10"
    assert DATASETS["cifar10"].image_column == "img"
    assert DATASETS["digits"].hub_id is None  # the built-in default needs no download
    for spec in DATASETS.values():
        assert spec.model in MODELS
        assert len(spec.mean) == len(spec.std) == spec.shape[0]
        assert spec.test_split == "test"


def test_unknown_dataset_names_the_allowed_ones():
    with pytest.raises(ValueError, match="dataset='nope'.*mnist.*owner/name"):
        data.get_spec("nope")


# --- local copies through the real flwr-datasets path -----------------------

@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("partitioning", ["iid", "dirichlet", "shard"])
def test_local_copy_partitions_cover_the_train_split(copies, name, partitioning):
    spec = DATASETS[name]
    counts = data.partition_label_counts(name, partitioning, NUM_PARTITIONS, alpha=0.5,
                                         seed=42, data_dir=copies[name])
    assert len(counts) == NUM_PARTITIONS and all(len(row) == 10 for row in counts)
    sizes = [sum(row) for row in counts]
    if partitioning == "shard":  # 2 shards per client; FedAvg drops the remainder
        shard = N_TRAIN // (2 * NUM_PARTITIONS)
        assert sizes == [2 * shard] * NUM_PARTITIONS
        for row in counts:  # each shard is a run of the label-sorted data: 2 label runs
            present = np.flatnonzero(row)
            assert len(present) <= 6 and np.count_nonzero(np.diff(present) > 1) <= 1
    else:
        assert sum(sizes) == N_TRAIN
    if partitioning == "iid":
        assert max(sizes) - min(sizes) <= 1
        assert min(sum(n > 0 for n in row) for row in counts) >= 7

    for pid in range(NUM_PARTITIONS):
        train, val = data.load_client_data(name, pid, NUM_PARTITIONS, partitioning, 0.5, 42,
                                           data_dir=copies[name])
        assert len(train.labels) + len(val.labels) == sizes[pid]
        assert train.images.shape[1:] == spec.shape and train.images.dtype == torch.float32
        assert 0 <= int(train.labels.min()) and int(train.labels.max()) < spec.num_classes
        assert_pixels_encode(train, spec, TRAIN_OFFSET)  # from the train parquet
        assert np.bincount(np.concatenate([train.labels, val.labels]),
                           minlength=10).tolist() == counts[pid]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_server_test_split_is_the_test_parquet(copies, name):
    spec = DATASETS[name]
    test = data.load_test_data(name, 42, data_dir=copies[name])
    assert test.images.shape == (N_TEST, *spec.shape)
    assert_pixels_encode(test, spec, TEST_OFFSET)
    assert np.bincount(test.labels.numpy()).tolist() == [N_TEST // 10] * 10
    # normalised: the label-0 train pixels of channel 0 sit at (0/255 - mean) / std
    train, _ = data.load_client_data(name, 0, 1, "iid", 0.5, 42, data_dir=copies[name])
    zero = train.images[train.labels == 0][:, 0]
    torch.testing.assert_close(zero, torch.full_like(zero, -spec.mean[0] / spec.std[0]))


def test_dirichlet_is_skewed_and_reproducible(copies):
    args = ("mnist", "dirichlet", NUM_PARTITIONS, 0.1, 7)
    counts = data.partition_label_counts(*args, data_dir=copies["mnist"])
    assert counts == data.partition_label_counts(*args, data_dir=copies["mnist"])
    iid = data.partition_label_counts("mnist", "iid", NUM_PARTITIONS, 0.1, 7,
                                      data_dir=copies["mnist"])
    spread = lambda c: np.mean([max(row) / max(sum(row), 1) for row in c])  # noqa: E731
    assert spread(counts) > spread(iid) + 0.1  # alpha=0.1: few labels dominate a client


def test_hub_cache_copy_uses_the_snapshot_main_points_at(copies, tmp_path):
    """A copied ~/.cache/huggingface whose hub/ holds the downloaded parquet files."""
    repo = tmp_path / "huggingface" / "hub" / "datasets--ylecun--mnist"
    good, stale = repo / "snapshots" / "c0ffee", repo / "snapshots" / "0ld"
    shutil.copytree(Path(copies["mnist"]) / "mnist", good / "mnist")
    (stale / "mnist").mkdir(parents=True)  # an older revision with no test split
    shutil.copy(good / "mnist" / "train-00000-of-00001.parquet", stale / "mnist")
    os.utime(stale, (time.time() + 60,) * 2)  # newest on disk, yet not `main`
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    test = data.load_test_data("mnist", 42, data_dir=str(tmp_path / "huggingface"))
    assert_pixels_encode(test, DATASETS["mnist"], TEST_OFFSET)
    assert len(test.labels) == N_TEST


def test_datasets_cache_copy_loads_offline(copies, tmp_path):
    """A copied `datasets` cache (Arrow files), as `load_dataset("ylecun/mnist")` leaves it."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "huggingface" / "datasets"
    files = DataFilesDict.from_patterns({"train": ["mnist/train-*"], "test": ["mnist/test-*"]},
                                        base_path=copies["mnist"])
    builder = Parquet(cache_dir=str(cache), dataset_name="mnist", repo_id="ylecun/mnist",
                      config_name="mnist", data_files=files, hash="c0ffee")
    builder.download_and_prepare()
    # the Hub's own download names the folder by config only
    (built,) = (cache / "ylecun___mnist").iterdir()
    built.rename(cache / "ylecun___mnist" / "mnist")
    for data_dir in (cache, cache.parent):  # the datasets cache, or ~/.cache/huggingface
        test = data.load_test_data("mnist", 42, data_dir=str(data_dir))
        assert len(test.labels) == N_TEST
        assert_pixels_encode(test, DATASETS["mnist"], TEST_OFFSET)


def test_bad_data_dir_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="data-dir=.*not a directory"):
        data.load_test_data("mnist", 42, data_dir=str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="data-dir=.*hf download"):
        data.load_test_data("mnist", 42, data_dir=str(tmp_path))


def test_wrong_column_names_the_columns(copies):
    with pytest.raises(ValueError, match="'image' is not in .*columns: img, label"):
        data.load_test_data("cifar10", 42, data_dir=copies["cifar10"], image_column="image")


# --- offline: no copy, no Hub ----------------------------------------------

def test_offline_without_copy_fails_fast_and_says_what_to_do(monkeypatch):
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        data.load_test_data("cifar10", 42)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "data-dir=" in message and "hf download uoft-cs/cifar10 --repo-type dataset" in message
    assert "--run-config \"dataset='digits'\"" in message
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"  # set so `datasets` gave up at once


def test_offline_failure_in_a_fresh_process_takes_seconds(tmp_path):
    """What a user sees: the whole process, imports included, fails in seconds."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path)}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", "from dpfl_app.data import datasets as data; data.load_test_data('mnist')"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert time.monotonic() - start < 20
    assert out.returncode != 0 and "data-dir=" in out.stderr, out.stderr[-2000:]


# --- any Hub image-classification dataset ------------------------------------

@pytest.mark.parametrize("size, mode, model, shape", [
    (20, "RGB", "lenet", (3, 32, 32)),
    (16, "L", "mnist-cnn", (1, 28, 28)),
])
def test_other_hub_dataset_gets_a_model_by_its_images(tmp_path, size, mode, model, shape):
    for split, n, offset in (("train", 60, TRAIN_OFFSET), ("test", 12, TEST_OFFSET)):
        write_split(tmp_path / "data" / f"{split}-00000-of-00001.parquet",
                    balanced_labels(n, 3, num_classes=3), offset, size, mode, True,
                    image_column="picture", label_column="category", num_classes=3)
    kwargs = dict(data_dir=str(tmp_path), image_column="picture", label_column="category")
    spec = data.describe("someone/shapes", **kwargs)
    assert (spec.model, spec.shape, spec.num_classes) == (model, shape, 3)
    test = data.load_test_data("someone/shapes", 42, **kwargs)
    assert test.images.shape == (12, *shape)
    assert_pixels_encode(test, spec, TEST_OFFSET)  # resized: a flat image keeps its value
    out = build_model(spec.model, spec.num_classes)(test.images)
    assert out.shape == (12, 3)
    counts = data.partition_label_counts("someone/shapes", "dirichlet", 3, 0.5, 42, **kwargs)
    assert sum(map(sum, counts)) == 60 and len(counts[0]) == 3


# --- the built-in default ---------------------------------------------------

def test_digits_train_and_test_are_disjoint_and_complete():
    train, val = data.load_client_data("digits", 0, 1, "iid", 0.5, 42,
                                       val_fraction=data.CLIENT_VAL_FRACTION)
    test = data.load_test_data("digits", 42)
    as_rows = lambda t: {row.tobytes() for row in t.images.numpy()}  # noqa: E731
    train_rows, val_rows, test_rows = as_rows(train), as_rows(val), as_rows(test)
    assert not train_rows & test_rows and not val_rows & test_rows and not train_rows & val_rows
    assert len(train_rows) + len(val_rows) + len(test_rows) == 1797
    assert train.images.shape[1:] == (1, 8, 8)


# --- models -----------------------------------------------------------------

@pytest.mark.parametrize("name", list(DATASETS))
def test_default_model_is_all_float_and_fits_the_dataset(name):
    spec = DATASETS[name]
    torch.manual_seed(0)
    net = build_model(spec.model, spec.num_classes)
    assert all(t.is_floating_point() for t in net.state_dict().values())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert net(torch.zeros(2, *spec.shape)).shape == (2, spec.num_classes)


def test_every_model_state_dict_is_float():
    for name in MODELS:
        state = build_model(name).state_dict()
        assert state and all(t.dtype == torch.float32 for t in state.values()), name


# --- reporting --------------------------------------------------------------

def test_label_histogram_text_and_plot(tmp_path):
    counts = [[5, 0, 3], [0, 12, 1]]
    text = data.format_label_histogram(counts)
    lines = text.splitlines()
    assert lines[0].split() == ["client", "total", "0", "1", "2"]
    assert lines[1].split() == ["0", "8", "5", "0", "3"]
    assert lines[2].split() == ["1", "13", "0", "12", "1"]
    path = plots.plot_partitions(counts, tmp_path / "partitions.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- run config -------------------------------------------------------------

def test_run_config_accepts_hub_ids_and_shard():
    pytest.importorskip("dpfl_app.privacy.accounting")
    from dpfl_app.config import ConfigError, validate

    defaults = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert defaults["data-dir"] == defaults["image-column"] == defaults["label-column"] == ""
    for dataset in ("mnist", "fashion-mnist", "cifar10", "owner/some-set"):
        assert validate({**defaults, "dataset": dataset})["dataset"] == dataset
    assert validate({**defaults, "partitioning": "shard"})["partitioning"] == "shard"
    with pytest.raises(ConfigError, match="'dataset' = 'nope'.*owner/name"):
        validate({**defaults, "dataset": "nope"})


# --- centralised baseline ---------------------------------------------------

def test_baseline_cli_on_digits(tmp_path):
    out = tmp_path / "baseline.json"
    run = subprocess.run(
        [sys.executable, "-m", "dpfl_app.tools.baseline", "--dataset", "digits", "--epochs", "2",
         "--output", str(out)],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "test accuracy" in run.stdout
    result = json.loads(out.read_text())
    assert result["model"] == DATASETS["digits"].model and result["test_examples"] == 360
    assert result["test_accuracy"] > 0.8  # chance is 0.1; centralised digits reaches ~0.95


def test_baseline_help():
    run = subprocess.run([sys.executable, "-m", "dpfl_app.tools.baseline", "--help"], cwd=PROJECT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--data-dir" in run.stdout


@pytest.mark.parametrize("num_partitions", [1, 7, 150])
def test_iid_label_counts_read_once_equal_each_partition_loaded(num_partitions):
    """The IID histogram from one pass over the labels equals the partitioner's own
    partitions, loaded one by one (so a change in flwr-datasets' sharding shows here)."""
    spec = data.describe("digits")
    partitioner, _ = data._partitioned("digits", "", "", "", "iid", num_partitions, 0.5, 42)
    loaded = [np.bincount(np.asarray(partitioner.load_partition(pid)[spec.label_column]),
                          minlength=10).tolist() for pid in range(num_partitions)]
    assert data.partition_label_counts("digits", "iid", num_partitions) == loaded
    bounds = data.iid_shard_bounds(len(partitioner.dataset), num_partitions)
    assert [end - start for start, end in bounds] == [len(partitioner.load_partition(pid))
                                                      for pid in range(num_partitions)]


def test_builtin_iid_partitions_are_slices_of_the_converted_train_split():
    """The built-in data set's fast path gives each client exactly its `load_partition` rows."""
    import torch

    spec = data.describe("digits")
    for num_partitions in (7, 150):
        partitioner, _ = data._partitioned("digits", "", "", "", "iid", num_partitions, 0.5, 42)
        for pid in (0, 3, num_partitions - 1):
            fast, val = data.load_client_data.__wrapped__("digits", pid, num_partitions)
            slow, _ = data.split_for_client(partitioner.load_partition(pid), spec, 42)
            assert torch.equal(fast.images, slow.images) and torch.equal(fast.labels, slow.labels)
            assert len(val.labels) == 0
