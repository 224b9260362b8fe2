"""Server optimizers on the noised mean: sgd, momentum (DP-FedAvgM), adam (FedAdam)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpfl_app.privacy import mechanism
from dpfl_app.strategy.server_optimizer import ADAM_EPS, ServerOptimizer
from tests.fresh_python import run_python
from tests.inprocess import ServerCrash, default_run_config, run_server

SHAPES = [(4, 3), (3,)]


def _arrays(seed: int, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(scale * rng.normal(size=s)).astype(np.float32) for s in SHAPES]


def test_sgd_is_the_plain_server_lr_step_bit_for_bit():
    """`sgd` through torch.optim equals the mechanism's w + server_lr * mean exactly."""
    global_model = _arrays(0)
    clients = [[g + d for g, d in zip(global_model, _arrays(s, 0.1))] for s in (1, 2, 3)]
    split = mechanism.split_noise(0.5, 3)
    kwargs = dict(server_lr=2.0, target_quantile=0.5, clip_lr=0.2)
    plain = mechanism.dp_fedavg_step(global_model, clients, [1, 0, 1], 0.2, 3, split,
                                     np.random.default_rng(7), **kwargs)
    optimizer = ServerOptimizer("sgd", global_model, lr=2.0)
    stepped = mechanism.dp_fedavg_step(global_model, clients, [1, 0, 1], 0.2, 3, split,
                                       np.random.default_rng(7), step=optimizer.step, **kwargs)
    for a, b in zip(plain[0], stepped[0]):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert plain[1:] == stepped[1:]


def test_the_default_sgd_server_never_imports_torch_dynamo():
    """`sgd` takes the plain step (equal to torch.optim.SGD, above) without torch.optim,
    whose first call imports torch._dynamo: seconds at the start of every run."""
    out = run_python("""
        import sys
        from dpfl_app.strategy.build import build_strategy
        from tests.inprocess import default_run_config
        from dpfl_app.config import validate
        for name in ("sgd", "momentum"):
            strategy = build_strategy(validate(default_run_config(**{"server-optimizer": name})),
                                      10, 0.3)
            print(name, strategy.server_optimizer is None, "torch._dynamo" in sys.modules)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["sgd True False", "momentum False True"], out.stdout


def test_momentum_accumulates_the_released_means():
    """v = mu v + mean; w += lr v (DP-FedAvgM), over two rounds."""
    w0, u1, u2 = _arrays(0), _arrays(1, 0.1), _arrays(2, 0.1)
    optimizer = ServerOptimizer("momentum", w0, lr=0.5, momentum=0.8)
    w1 = optimizer.step(w0, u1)
    w2 = optimizer.step(w1, u2)
    for a0, a1, a2, d1, d2 in zip(w0, w1, w2, u1, u2):
        np.testing.assert_allclose(a1, a0 + 0.5 * d1, rtol=1e-6)
        np.testing.assert_allclose(a2, a1 + 0.5 * (0.8 * d1 + d2), rtol=1e-6, atol=1e-7)


def test_adam_first_step_is_lr_times_mean_over_its_magnitude():
    """Adam's bias-corrected first step: lr * g / (|g| + eps), with g = -mean."""
    w0, u = _arrays(0), _arrays(1, 0.01)
    w1 = ServerOptimizer("adam", w0, lr=0.1).step(w0, u)
    for a0, a1, d in zip(w0, w1, u):
        np.testing.assert_allclose(a1 - a0, 0.1 * d / (np.abs(d) + ADAM_EPS), rtol=1e-4)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_state_survives_a_checkpoint_round_trip(name):
    """Saved and loaded as checkpoint.pt does (weights_only): the next step is the same."""
    w0, u1, u2 = _arrays(0), _arrays(1, 0.1), _arrays(2, 0.1)
    first = ServerOptimizer(name, w0, lr=0.3)
    w1 = first.step(w0, u1)
    buffer = io.BytesIO()
    torch.save({"server_optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    second = ServerOptimizer(name, w0, lr=0.3)
    second.load_state_dict(torch.load(buffer, weights_only=True)["server_optimizer"])
    for a, b in zip(first.step(w1, u2), second.step(w1, u2)):
        np.testing.assert_array_equal(a, b)


def test_the_config_lists_the_same_optimizers():
    from dpfl_app.config import SERVER_OPTIMIZERS as listed
    from dpfl_app.strategy.server_optimizer import SERVER_OPTIMIZERS
    assert listed == SERVER_OPTIMIZERS


def _final_model(out) -> dict:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return torch.load(run_dir / "final_model.pt", weights_only=True), run_dir


def _crash_resume_and_compare(tmp_path, keys: dict, edit_checkpoint=None) -> Path:
    """Run `keys` straight and with a crash after round 2 then a resume (the checkpoint
    first passed through `edit_checkpoint`); both must end on the same model."""
    config = lambda out: default_run_config(**{  # noqa: E731
        "output-dir": str(out), "deterministic-noise": True, "rounds": 3, **keys})
    run_server(config(tmp_path / "straight"))
    expected, _ = _final_model(tmp_path / "straight")
    crashing = config(tmp_path / "crash")
    with pytest.raises(ServerCrash):
        run_server(crashing, crash_after_train_round=2)
    _, run_dir = _final_model(tmp_path / "crash")
    if edit_checkpoint:
        saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        torch.save(edit_checkpoint(saved), run_dir / "checkpoint.pt")
    run_server({**crashing, "resume-from": str(run_dir)})
    resumed, _ = _final_model(tmp_path / "crash")
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    return run_dir


def test_resume_restores_the_momentum(tmp_path):
    """A crashed momentum run, resumed, ends on the same model as an uninterrupted one."""
    run_dir = _crash_resume_and_compare(
        tmp_path, {"server-optimizer": "momentum", "server-lr": 0.5})
    rounds = json.loads((run_dir / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]


def test_an_sgd_checkpoint_with_torch_optims_empty_state_still_resumes(tmp_path):
    """Checkpoints written before `sgd` dropped torch.optim hold SGD's (empty) state;
    the plain step has none to restore, so a resume ignores it and ends where an
    uninterrupted run does."""
    def old_style(saved: dict) -> dict:
        assert saved["server_optimizer"] is None  # what `sgd` writes now
        like = [torch.nn.Parameter(torch.zeros(2))]
        return {**saved, "server_optimizer": torch.optim.SGD(like, lr=1.0).state_dict()}

    _crash_resume_and_compare(tmp_path, {}, old_style)
