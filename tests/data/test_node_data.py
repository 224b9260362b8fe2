"""A SuperNode's own data (`data-path`, run-config node-data='local'), and its errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from dpfl_app.data import node_data
from dpfl_app.config import ConfigError, client_settings
from dpfl_app.data.datasets import DATASETS, load_client_data
from dpfl_app.run.outputs import read_diagnostics
from dpfl_app.tools import export_data
from tests.inprocess import InProcessGrid, default_run_config, run_server
from tests.data.test_data import balanced_labels, hermetic_hf, write_split  # noqa: F401 (fixture)

DIGITS = DATASETS["digits"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """digits' 3 demo partitions, exported as three sites' data folders."""
    root = tmp_path_factory.mktemp("sites")
    export_data.main([str(root), "--num-partitions", "3"])
    return [root / f"site-{i}" for i in range(3)]


def _context(node_config: dict, **run_config) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config=default_run_config(**run_config))


def test_an_exported_partition_loads_as_the_same_tensors(sites):
    """data-path and the demo partition it was exported from give identical data."""
    for path in (sites[1], sites[1] / "train.parquet"):  # the folder, or the one file
        train, val = node_data.load_node_data(str(path), DIGITS, 42)
        expected_train, expected_val = load_client_data("digits", 1, 3)
        assert torch.equal(train.images, expected_train.images)
        assert torch.equal(train.labels, expected_train.labels)
        assert torch.equal(val.labels, expected_val.labels)


def test_client_settings_take_data_path_in_local_mode(sites):
    settings = client_settings(_context({"data-path": str(sites[0])}, **{"node-data": "local"}))
    assert settings.data_path == str(sites[0])
    train, _ = node_data.client_data(settings)
    assert len(train.labels) > 100


@pytest.mark.parametrize("node_config, node_mode, message", [
    ({"partition-id": 0, "num-partitions": 3}, "local",
     r"'data-path' = None: run-config node-data='local' needs .*--node-config "
     r"'data-path=\"/absolute/path"),
    ({"data-path": 5}, "local", r"'data-path' = 5: .*a folder of parquet files"),
    ({"data-path": "/srv/site"}, "partitions",
     r"no 'partition-id'.*This node has a data-path: run with .*node-data='local'"),
    ({"partition-id": 3, "num-partitions": 3}, "partitions",
     r"'partition-id' = 3, 'num-partitions' = 3: expected integers with 0 <= partition-id"),
    ({"partition-id": "0", "num-partitions": 3}, "partitions", r"'partition-id' = '0'"),
])
def test_missing_or_wrong_node_config_fails_clearly(node_config, node_mode, message):
    with pytest.raises(ConfigError, match=message):
        client_settings(_context(node_config, **{"node-data": node_mode}))


def _write_digits(path, labels, image_column="image"):
    from datasets import Dataset

    images = np.zeros((len(labels), 8, 8), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict({image_column: images, "label": labels}).to_parquet(str(path))


@pytest.mark.parametrize("layout, problem", [
    ("relative", "is not an absolute path"),
    ("missing", "does not exist"),
    ("csv-file", "is a file but not a .parquet file"),
    ("empty-folder", "holds no .parquet file"),
    ("test-split-only", "has no train split (found: test)"),
    ("wrong-column", "has no column 'image' (columns: pixels, label)"),
    ("labels-out-of-range", "has labels outside [0, 10): [10, 12]"),
    ("one-example", "has 1 example(s), fewer than 2"),
])
def test_bad_data_path_names_the_key_the_value_and_the_format(tmp_path, layout, problem):
    path = tmp_path / "site"
    if layout == "relative":
        path = "site-data"
    elif layout == "csv-file":
        path = tmp_path / "site.csv"
        path.write_text("image,label\n")
    elif layout == "empty-folder":
        path.mkdir()
    elif layout == "test-split-only":
        _write_digits(path / "test-00000-of-00001.parquet", [0, 1])
    elif layout == "wrong-column":
        _write_digits(path / "train.parquet", [0, 1], image_column="pixels")
    elif layout == "labels-out-of-range":
        _write_digits(path / "train.parquet", [0, 10, 12, 3])
    elif layout == "one-example":
        _write_digits(path / "train.parquet", [4])
    with pytest.raises(ConfigError) as err:
        node_data.load_node_data(str(path), DIGITS, 42)
    text = str(err.value)
    assert text.startswith(f"node config 'data-path' = {str(path)!r} {problem}; expected ")
    assert "columns 'image' (images) and 'label' (integer labels in [0, 10))" in text


def test_png_images_in_the_hub_schema_load(tmp_path):
    """An mnist-schema site: PNG bytes in an Image struct, as `datasets` writes them."""
    labels = balanced_labels(20, seed=3)
    write_split(tmp_path / "train-00000-of-00001.parquet", labels, 0, 28, "L", metadata=False)
    train, val = node_data.load_node_data(str(tmp_path), DATASETS["mnist"], 42, 0.2)
    assert train.images.shape == (16, 1, 28, 28) and val.images.shape == (4, 1, 28, 28)
    assert sorted(train.labels.tolist() + val.labels.tolist()) == sorted(labels.tolist())


class SitesGrid(InProcessGrid):
    """Every node reads its own site folder, as SuperNodes started with data-path."""

    def __init__(self, run_config: dict, sites: list) -> None:
        super().__init__(run_config, num_nodes=len(sites))
        self.sites = sites

    def context(self, node_id: int) -> Context:
        return Context(run_id=1, node_id=node_id, state=RecordDict(),
                       node_config={"data-path": str(self.sites[node_id - 1])},
                       run_config=self.run_config)


def test_the_app_trains_on_site_folders_without_demo_partitions(sites, tmp_path, monkeypatch):
    sites = [shutil.copytree(site, tmp_path / site.name) for site in sites]
    out = tmp_path / "out"
    cfg = default_run_config(**{"node-data": "local", "rounds": 2, "clients": 3,
                                "sampling": "fixed", "output-dir": str(out)})
    monkeypatch.setattr("dpfl_app.tools.inprocess.InProcessGrid",
                        lambda run_config, **_: SitesGrid(run_config, sites))
    run_server(cfg)
    (run_dir,) = out.iterdir()
    # Exact reply counts are in the operator diagnostics only (never in results.json).
    assert [d["num_replies"] for d in read_diagnostics(run_dir)] == [3, 3]
    assert not (run_dir / "partitions.png").exists()  # the server never sees site data
    # A site whose folder disappeared fails the run with the key and the path.
    shutil.rmtree(sites[2])
    node_data.load_node_data.cache_clear()
    with pytest.raises(ConfigError, match=r"'data-path' = '.*site-2' does not exist"):
        run_server({**cfg, "output-dir": str(tmp_path / "out2")})
