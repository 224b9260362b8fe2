"""The study engine's benchmark workload in pfl-research (Granqvist et al. 2024), for comparison.

Runs in its own environment with `pfl==0.6.0` (it pins dp-accounting < 0.6,
which this app cannot use); `dpfl bench-study --pfl-python` starts it:

    python -m venv pflvenv && pflvenv/bin/pip install pfl==0.6.0 torch scikit-learn
    dpfl bench-study --pfl-python pflvenv/bin/python

It reads what `dpfl bench-study` wrote: the users' data exactly as the app's
ClientApps hold them and the test set (`--data`, .npz), and the workload
(`--workload`, JSON): the model, local epochs, batch size, learning rates,
the expected cohort m with Poisson cohort sizes, the app's noise multiplier
z and count noise sigma_b, and adaptive clipping (Andrew et al. 2021) with
the app's initial clip, quantile and step. pfl's adaptive mechanism with
indicator noise 2 sigma_b (its indicator is +-1, the app's b - 1/2) is the
app's noise split. Updates are weighted per user, as the app divides by m.

The timer covers what the engine's covers: every round and one evaluation
of the final model on the test set. Set-up (imports, data, model, the
mechanism) and one throwaway round of one user (torch.optim's first step
imports torch._dynamo, about 2 s) come before it. It prints one JSON line:
the workload as it ran (for `dpfl bench-study` to compare with the
engine's), the client updates it trained, the timer and the accuracy.
Nothing of dpfl_app is imported: pfl runs in its own environment.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import time


def fingerprint(*arrays) -> str:
    """sha256 of the arrays' bytes: the users' data, the same on both sides or not."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def build_net(name: str):
    """The app's digits models (dpfl_app/task.py), layer for layer."""
    from torch import nn

    if name == "digits-mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    if name == "digits-linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    if name == "digits-cnn":
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(32 * 2 * 2, 10))
    raise ValueError(f"model {name!r}: this workload has digits-linear, digits-mlp, digits-cnn")


def pfl_model(name: str, server_lr: float):
    import torch
    from torch import nn
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = build_net(name)

        def forward(self, x):
            return self.net(x)

        def loss(self, x, y, eval=False):  # noqa: A002  (pfl's signature)
            return nn.functional.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y, eval=True):  # noqa: A002
            return {"accuracy": Weighted((self(x).argmax(1) == y).sum().item(), len(y))}

    net = Classifier()
    return net, PyTorchModel(
        model=net, local_optimizer_create=functools.partial(torch.optim.SGD, momentum=0.9),
        central_optimizer=torch.optim.SGD(net.parameters(), lr=server_lr))


def poisson_users(arrays: dict, clients: int, seed: int):
    """pfl's FederatedDataset with the app's users and Poisson cohort sizes Binomial(N, m/N).

    pfl samples a fixed cohort; the app samples each user with probability m/N.
    The cohort size is drawn as the app's is distributed, and pfl's own sampler
    picks that many users. `trained` counts the users handed out: the updates.
    """
    import numpy as np
    import torch
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler

    offsets = arrays["offsets"]
    population = len(offsets) - 1
    images, labels = torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"])
    ids = [str(i) for i in range(population)]
    make = lambda uid: Dataset(  # noqa: E731
        raw_data=(images[offsets[int(uid)]:offsets[int(uid) + 1]],
                  labels[offsets[int(uid)]:offsets[int(uid) + 1]]), user_id=uid)
    sizes = np.random.default_rng(seed)

    class PoissonCohorts(FederatedDataset):
        trained = 0

        def get_cohort(self, cohort_size):
            size = int(sizes.binomial(population, clients / population))
            self.trained += size
            return super().get_cohort(size)

    return PoissonCohorts(make, get_user_sampler("minimize_reuse", ids))


def mechanism(work: dict):
    from pfl.privacy.adaptive_clipping import AdaptiveClippingGaussianMechanism
    from pfl.privacy.gaussian_mechanism import GaussianMechanism

    return AdaptiveClippingGaussianMechanism(
        make_gaussian_mechanism=lambda clip: GaussianMechanism(clip, work["noise"]),
        initial_clipping_bound=work["initial_clip"],
        clipping_indicator_noise_stddev=2 * work["count_stddev"],
        adaptive_clipping_norm_quantile=work["target_quantile"],
        log_space_step_size=work["clip_lr"])


def run(work: dict, arrays: dict) -> dict:
    import numpy as np
    import pfl
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.data.dataset import Dataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams

    torch.set_num_threads(1)  # as the study engine: small models, a shared machine
    setup = time.perf_counter()
    torch.manual_seed(work["seed"])
    np.random.seed(work["seed"])
    net, model = pfl_model(work["model"], work["server_lr"])
    test_set = Dataset(raw_data=(torch.from_numpy(arrays["test_images"]),
                                 torch.from_numpy(arrays["test_labels"])))
    train_params = NNTrainHyperParams(local_learning_rate=work["lr"],
                                      local_num_epochs=work["local_epochs"],
                                      local_batch_size=work["batch_size"])
    eval_params = NNEvalHyperParams(local_batch_size=512)

    def rounds(model_, users, count, cohort):
        backend = SimulatedBackend(training_data=users, val_data=None,
                                   postprocessors=[WeightByUser(), mechanism(work)])
        FederatedAveraging().run(
            algorithm_params=NNAlgorithmParams(central_num_iterations=count,
                                               evaluation_frequency=count,
                                               train_cohort_size=cohort, val_cohort_size=0),
            backend=backend, model=model_, model_train_params=train_params,
            model_eval_params=eval_params, callbacks=[])

    # Warm-up: one round of one user on a throwaway copy, with its own users.
    warm = {**arrays, "offsets": arrays["offsets"][:2]}
    rounds(copy.deepcopy(model), poisson_users(warm, 1, work["seed"]), 1, 1)
    users = poisson_users(arrays, work["clients"], work["seed"])
    start, cpu = time.perf_counter(), time.process_time()
    rounds(model, users, work["rounds"], work["clients"])
    metrics = model.evaluate(test_set, lambda name: name, eval_params)
    end, cpu = time.perf_counter(), time.process_time() - cpu
    accuracy = next(float(v.overall_value) for k, v in metrics if "accuracy" in str(k))
    ran = {**work, "weights": sum(p.numel() for p in net.parameters()),
           "data": fingerprint(arrays["images"], arrays["labels"], arrays["offsets"]),
           "population": len(arrays["offsets"]) - 1}
    return {"engine": f"pfl {pfl.__version__}", "workload": ran, "updates": users.trained,
            "setup_s": start - setup, "loop_s": end - start, "loop_cpu_s": cpu,
            "ms_per_client_update": 1000 * (end - start) / max(users.trained, 1),
            "cpu_ms_per_client_update": 1000 * cpu / max(users.trained, 1),
            "test_accuracy": accuracy}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, help="JSON file written by bench-study")
    parser.add_argument("--data", required=True, help=".npz file written by bench-study")
    args = parser.parse_args(argv)
    import numpy as np

    with open(args.workload) as handle:
        work = json.load(handle)
    with np.load(args.data) as loaded:
        arrays = dict(loaded)
    print(json.dumps(run(work, arrays)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
