"""`dpfl export-data`: demo partitions written as site folders for `node-data='local'`."""

from __future__ import annotations

import argparse
from pathlib import Path

from dpfl_app.data.node_data import export_partition
from dpfl_app.tools.cli import HelpFormatter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dpfl export-data",
        description="Write demo partitions as site data folders for `data-path`: "
                    "one folder per partition, OUT/site-<i>/.",
        formatter_class=HelpFormatter)
    parser.add_argument("out", type=Path, help="folder for site-<i>/ subfolders")
    parser.add_argument("--dataset", default="digits", help="registry name or Hub id")
    parser.add_argument("--num-partitions", type=int, required=True, help="sites to write")
    parser.add_argument("--partitioning", default="iid", help="iid, dirichlet or shard")
    parser.add_argument("--dirichlet-alpha", type=float, default=0.5, help="for dirichlet")
    parser.add_argument("--seed", type=int, default=42, help="partitioning seed")
    parser.add_argument("--data-dir", default="", help="local copy of the dataset (offline)")
    args = parser.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    for i in range(args.num_partitions):
        folder = export_partition(args.out / f"site-{i}", args.dataset, i, args.num_partitions,
                                  args.partitioning, args.dirichlet_alpha, args.seed,
                                  args.data_dir)
        print(f"data-path=\"{folder.resolve()}\"")
