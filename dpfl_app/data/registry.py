"""The dataset registry: what the app needs to know about each dataset.

Adding a dataset is one `DATASETS` entry. A Hugging Face Hub id that is not in
the registry (`owner/name`) also works; `data.describe` completes its spec from
its images.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the app needs to know about one dataset."""

    hub_id: str | None  # None: built in, needs no download
    image_column: str
    label_column: str
    shape: tuple[int, int, int]  # C x H x W the model sees
    max_value: float  # raw pixel range, to scale into [0, 1]
    mean: tuple[float, ...]  # per-channel normalisation after scaling
    std: tuple[float, ...]
    model: str  # default model (task.MODELS)
    test_split: str = "test"  # the server's held-out test set
    num_classes: int = 10


# Adding a dataset is one entry here.
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(None, "image", "label", (1, 8, 8), 16.0, (0.305,), (0.375,),
                          "digits-linear"),
    "mnist": DatasetSpec("ylecun/mnist", "image", "label", (1, 28, 28), 255.0, (0.1307,),
                         (0.3081,), "mnist-cnn"),
    "fashion-mnist": DatasetSpec("zalando-datasets/fashion_mnist", "image", "label",
                                 (1, 28, 28), 255.0, (0.2860,), (0.3530,), "mnist-cnn"),
    "cifar10": DatasetSpec("uoft-cs/cifar10", "img", "label", (3, 32, 32), 255.0,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "lenet"),
}
# Any other Hub image-classification dataset: its images are resized to the
# input of a model we have, grey to 28x28 (mnist-cnn), colour to 32x32 (lenet),
# and scaled to [-1, 1] as Flower's quickstart-pytorch Normalize((0.5,), (0.5,)) does.
GREY = dict(shape=(1, 28, 28), mean=(0.5,), std=(0.5,), model="mnist-cnn")
COLOUR = dict(shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, model="lenet")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes read as grey


def is_hub_id(name: str) -> bool:
    """Whether `name` looks like a Hugging Face dataset id, `owner/name`."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def get_spec(name: str, image_column: str = "", label_column: str = "") -> DatasetSpec:
    """The registry entry, or a Hub id's spec before its images are seen; "" = default."""
    if name in DATASETS:
        spec = DATASETS[name]
    elif is_hub_id(name):
        spec = DatasetSpec(name, "image", "label", max_value=255.0, **GREY)
    else:
        raise ValueError(f"dataset={name!r} is unknown; allowed: {', '.join(DATASETS)}, "
                         "or a Hugging Face dataset id owner/name")
    return dataclasses.replace(spec, image_column=image_column or spec.image_column,
                               label_column=label_column or spec.label_column)
