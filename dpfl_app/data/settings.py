"""What a ClientApp reads to find its data and train: `ClientSettings`.

`config.client_settings` fills it from the run config; the node config's data
keys (a demo partition, or the site's own `data-path`) are checked here, so
that the data layer never imports the run-config table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpfl_app.errors import ConfigError


@dataclass(frozen=True)
class ClientSettings:
    """What a ClientApp needs: run config plus its node's partition."""

    dataset: str
    model: str
    partitioning: str
    dirichlet_alpha: float
    seed: int
    local_epochs: int
    batch_size: int
    lr: float
    partition_id: int
    num_partitions: int
    data_dir: str = ""
    image_column: str = ""
    label_column: str = ""
    num_classes: int = 10
    data_path: str = ""  # node-data='local': this site's own files
    # Held out for client-side evaluation; 0 (client-eval off): train on all data.
    val_fraction: float = 0.0


def node_source(node: dict[str, Any], node_data: str) -> dict[str, Any]:
    """The node config's data keys, checked: `data-path`, or a demo partition."""
    if node_data == "local":
        path = node.get("data-path")
        if not isinstance(path, str) or not path:
            raise ConfigError(
                f"node config 'data-path' = {path!r}: run-config node-data='local' needs "
                "every SuperNode's own data; start the SuperNode with --node-config "
                "'data-path=\"/absolute/path/to/site-data\"' (a folder of parquet files, "
                "see deploy/README.md)"
            )
        return {"partition_id": 0, "num_partitions": 1, "data_path": path}
    for key in ("partition-id", "num-partitions"):
        if key not in node:
            hint = (" This node has a data-path: run with --run-config \"node-data='local'\"."
                    if "data-path" in node else "")
            raise ConfigError(
                f"node config has no {key!r}; start the SuperNode with "
                '--node-config "partition-id=<i> num-partitions=<n>"' + hint
            )
    pid, num = node["partition-id"], node["num-partitions"]
    if not (isinstance(pid, int) and isinstance(num, int) and 0 <= pid < num):
        raise ConfigError(
            f"node config 'partition-id' = {pid!r}, 'num-partitions' = {num!r}: expected "
            "integers with 0 <= partition-id < num-partitions"
        )
    return {"partition_id": pid, "num_partitions": num}
