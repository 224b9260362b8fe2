"""Centralised baseline: the same model on the pooled training data, no federation, no DP.

    dpfl baseline --dataset digits --epochs 10

It pools the training parts of all `--num-partitions` IID partitions, exactly
the examples the clients train on, and tests on the server's test split, so
its accuracy is the ceiling the federated (and DP) runs pay against.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dpfl_app.data.datasets import Tensors, describe, load_client_data, load_test_data, loader
from dpfl_app.task import MODELS, build_model, test, train
from dpfl_app.tools.cli import HelpFormatter


def pooled_train_data(args: argparse.Namespace) -> Tensors:
    """The training tensors of every partition, concatenated."""
    parts = [
        load_client_data(args.dataset, pid, args.num_partitions, "iid", 0.5, args.seed,
                         args.data_dir, args.image_column, args.label_column)[0]
        for pid in range(args.num_partitions)
    ]
    return Tensors(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def run(args: argparse.Namespace) -> dict:
    """Train centrally for `args.epochs` epochs; return the test metrics."""
    spec = describe(args.dataset, args.data_dir, args.image_column, args.label_column)
    model = spec.model if args.model == "auto" else args.model
    train_set = pooled_train_data(args)
    test_set = load_test_data(args.dataset, args.seed, args.data_dir, args.image_column,
                              args.label_column)
    torch.manual_seed(args.seed)
    net = build_model(model, spec.num_classes)
    start = time.monotonic()
    for epoch in range(args.epochs):
        train(net, loader(train_set, args.batch_size, shuffle=True, seed=args.seed + epoch),
              1, args.lr)
    loss, accuracy = test(net, loader(test_set, 512, shuffle=False))
    return {"dataset": args.dataset, "model": model, "epochs": args.epochs, "lr": args.lr,
            "batch_size": args.batch_size, "seed": args.seed,
            "train_examples": len(train_set.labels), "test_examples": len(test_set.labels),
            "test_loss": loss, "test_accuracy": accuracy,
            "seconds": round(time.monotonic() - start, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dpfl baseline", formatter_class=HelpFormatter,
        description="Centralised baseline: train the federated run's model on the pooled "
                    "training data, without federation or DP, and report test accuracy.",
    )
    parser.add_argument("--dataset", default="digits",
                        help="registry name or Hugging Face id owner/name")
    parser.add_argument("--model", default="auto", choices=["auto", *MODELS],
                        help="auto: the dataset's own model")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the pooled data")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per SGD step")
    parser.add_argument("--seed", type=int, default=42, help="model initialisation and shuffling")
    parser.add_argument("--num-partitions", type=int, default=10,
                        help="pool the training parts of this many partitions, as the "
                             "federation's clients hold them")
    parser.add_argument("--data-dir", default="", help="local copy of the dataset (offline)")
    parser.add_argument("--image-column", default="", help="empty: the dataset's own")
    parser.add_argument("--label-column", default="", help="empty: the dataset's own")
    parser.add_argument("--output", type=Path, help="also write the result as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(f"centralised baseline: dataset={result['dataset']} model={result['model']} "
          f"epochs={result['epochs']} train={result['train_examples']} "
          f"test={result['test_examples']}: test accuracy {result['test_accuracy']:.4f}, "
          f"loss {result['test_loss']:.4f}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
