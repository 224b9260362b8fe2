"""The study engine's benchmark workload in pfl-research (Granqvist et al. 2024), for comparison.

Runs in its own environment with `pfl==0.6.0` (it pins dp-accounting < 0.6,
which this app cannot use), for example:

    python -m venv pflvenv && pflvenv/bin/pip install pfl==0.6.0 torch scikit-learn
    pflvenv/bin/python dpfl_app/tools/study/pfl_workload.py --population 1437 --clients 718

The workload is the engine's: digits split and normalised as the app does
(80/20 stratified, seed 42), the first N training images as N one-image users,
the app's MLP (64-32-10), local SGD with momentum 0.9 at batch size 16 for one
epoch, central DP with adaptive clipping (Andrew et al. 2021) calibrated by
pfl's PLD accountant to (epsilon, 1e-5), and m users per round. It prints one
JSON line: the wall time of the training loop and its cost per client update.
Nothing of dpfl_app is imported: pfl runs in its own environment.
"""

from __future__ import annotations

import argparse
import functools
import json
import time


def digits_users(population: int, seed: int = 42):
    """(one-image users, test images, test labels) as numpy arrays, normalised like the app."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, stratify=digits.target, random_state=seed)
    norm = lambda x: ((x / 16.0 - 0.305) / 0.375).astype(np.float32)[:, None]  # noqa: E731
    return (norm(x_train)[:population], y_train[:population].astype(np.int64),
            norm(x_test), y_test.astype(np.int64))


def build(args):
    import numpy as np
    import torch
    from torch import nn
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import PLDPrivacyAccountant
    from pfl.privacy.adaptive_clipping import AdaptiveClippingGaussianMechanism
    from pfl.privacy.gaussian_mechanism import GaussianMechanism

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                     nn.Linear(32, 10))

        def forward(self, x):
            return self.net(x)

        def loss(self, x, y, eval=False):  # noqa: A002  (pfl's signature)
            return nn.functional.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y, eval=True):  # noqa: A002
            correct = (self(x).argmax(1) == y).sum().item()
            return {"accuracy": Weighted(correct, len(y))}

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    images, labels, test_x, test_y = digits_users(args.population, args.seed)
    users = {str(i): (torch.from_numpy(images[i:i + 1]), torch.from_numpy(labels[i:i + 1]))
             for i in range(len(labels))}
    make = lambda uid: Dataset(raw_data=users[uid], user_id=uid)  # noqa: E731
    federated = FederatedDataset(make, get_user_sampler("minimize_reuse", list(users)))
    test_set = Dataset(raw_data=(torch.from_numpy(test_x), torch.from_numpy(test_y)))
    net = MLP()
    model = PyTorchModel(model=net,
                         local_optimizer_create=functools.partial(torch.optim.SGD, momentum=0.9),
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=args.server_lr))
    accountant = PLDPrivacyAccountant(num_compositions=args.rounds,
                                      sampling_probability=args.clients / args.population,
                                      mechanism="gaussian", epsilon=args.epsilon, delta=1e-5)
    mechanism = AdaptiveClippingGaussianMechanism(
        make_gaussian_mechanism=lambda c: GaussianMechanism.from_privacy_accountant(
            accountant, c),
        initial_clipping_bound=args.initial_clip, clipping_indicator_noise_stddev=0.1 * args.clients,
        adaptive_clipping_norm_quantile=0.5)
    return federated, test_set, model, mechanism


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=1437)
    parser.add_argument("--clients", type=int, default=718)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--epsilon", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--server-lr", type=float, default=4.0)
    parser.add_argument("--initial-clip", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    import pfl
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams

    torch.set_num_threads(1)  # as the study engine: small models, a shared machine
    federated, test_set, model, mechanism = build(args)
    backend = SimulatedBackend(training_data=federated, val_data=None,
                               postprocessors=[mechanism])
    evaluation = CentralEvaluationCallback(test_set, NNEvalHyperParams(local_batch_size=512),
                                           frequency=args.rounds)
    start = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=args.rounds,
                                           evaluation_frequency=args.rounds,
                                           train_cohort_size=args.clients, val_cohort_size=0),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=args.lr, local_num_epochs=1,
                                              local_batch_size=16),
        model_eval_params=NNEvalHyperParams(local_batch_size=512), callbacks=[evaluation])
    wall = time.perf_counter() - start
    metrics = model.evaluate(test_set, lambda name: name, NNEvalHyperParams(local_batch_size=512))
    accuracy = next(float(v.overall_value) for k, v in metrics if "accuracy" in str(k))
    print(json.dumps({"engine": f"pfl {pfl.__version__}", "population": args.population,
                      "clients": args.clients, "rounds": args.rounds, "wall_s": wall,
                      "ms_per_client_update": 1000 * wall / (args.rounds * args.clients),
                      "test_accuracy": accuracy}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
