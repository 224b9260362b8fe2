"""Cost of distributed DP (noise-at=clients): client time, bytes, and noise against central DP.

    python -m dpfl_app.tools.bench.distributed_dp [--dims 2410,62006] [--bits 16,20]
        [--population 1437] [--clients 1000] [--rounds 40] [--delta 1e-5] [--epsilons 4,2]
        [--thresholds 0.5,0.8] [--reps 20]

Part 1, time: per client, the stages `secagg.discrete.encode` runs on a clipped
update of `dim` coordinates (2410: digits-mlp; 62006: lenet): the rotation, the
conditional rounding, drawing the Skellam share from the ChaCha20 CSPRNG, and
the reduction mod 2**b; and the server's decode of one sum. Medians of `reps`
interleaved repetitions, with the load average: compare them with a client's
training time measured beside them, never across machines.

Part 2, noise: for each sampling, target epsilon and threshold t (a fraction
of the expected cohort m), the central-DP noise multiplier (the app's
calibration and headline accountant, the count's sigma_b = m/20), and the
distributed one at t survivors, for the two figures `distributed_accounting`
reports: amplified by the server's sampling, and the client's own bound (no
amplification). For each b: the scale gamma, the rounding's inflation B/(gamma C),
and the resulting noise std on the sum when all m survive, relative to central DP's.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import numpy as np

from dpfl_app.privacy import calibration, distributed, mechanism, skellam
from dpfl_app.privacy import distributed_ledger
from dpfl_app.secagg import discrete, rotation

SEED = b"benchmark rotation seed 32 bytes"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def time_stages(dim: int, bits: int, clients: int, reps: int) -> dict[str, float]:
    """Median seconds of each client stage and of the server's decode, at `dim` coordinates."""
    template = distributed.DistributedDpParams(clip=1.0, dim=dim, scale=1.0, bits=bits,
                                               share_variance=0.0, count_share_variance=0.0,
                                               threshold=max(1, clients // 2))
    params = distributed.choose_scale(template, 1.0, clients / 20, clients)
    enc = discrete.Encoding(params.clip, params.scale, params.l2_sensitivity, bits, SEED, 0)
    rng = np.random.default_rng(0)
    delta = rng.normal(size=dim)
    delta /= np.linalg.norm(delta)
    stages: dict[str, list[float]] = {k: [] for k in ("rotate", "round", "noise", "modulus",
                                                      "encode", "decode")}
    for _ in range(reps):
        t0 = time.perf_counter()
        y = params.scale * rotation.rotate(delta, SEED, 0)
        t1 = time.perf_counter()
        q = discrete.conditional_round(y, params.l2_sensitivity, rng)
        t2 = time.perf_counter()
        share = skellam.noise_share(params.padded_dim, params.share_variance)  # the CSPRNG
        t3 = time.perf_counter()
        discrete.to_residues(q + share, bits)
        t4 = time.perf_counter()
        sent = discrete.encode(delta, 1, enc, rng, share, 0)
        t5 = time.perf_counter()
        discrete.decode(sent, enc, dim)
        t6 = time.perf_counter()
        for key, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            stages[key].append(seconds)
    result = {k: statistics.median(v) for k, v in stages.items()}
    result["encode"] += result["noise"]  # encode() takes the share already drawn
    result["bytes"] = params.bytes_per_client
    return result


TRAINING_CASES = (("digits-mlp", 1, 1), ("digits-mlp", 180, 5), ("lenet", 600, 1))


def time_overhead(model: str, images: int, epochs: int, bits: int, clients: int,
                  reps: int = 5, batch_size: int = 32) -> dict[str, float]:
    """The client's distributed-DP work against its training, interleaved rep by rep.

    Each rep trains the app's model with `task.train` (the ClientApp's step, on
    `images` random inputs of the dataset's shape) from the same start, then
    encodes the real update it produced as a client of a round does: a Skellam
    share from the CSPRNG, `discrete.encode` (clip, rotate, scale, round, add,
    mod 2**b) and `discrete.pack` (b bits a coordinate; masking, which the other
    modes do too, is left out), at the scale and share a cohort of `clients` needs (threshold 0.8 m,
    z = 6.3: the eps = 4 recipe's). Medians; `ratio` = encode / training.
    """
    import torch  # pylint: disable=import-outside-toplevel
    from torch.utils.data import DataLoader, TensorDataset  # pylint: disable=import-outside-toplevel

    from dpfl_app import task  # pylint: disable=import-outside-toplevel

    shape = (1, 8, 8) if model.startswith("digits") else (3, 32, 32)
    data = TensorDataset(torch.randn(images, *shape), torch.randint(0, 10, (images,)))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True)
    net = task.build_model(model)
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    flat = lambda state: torch.cat([v.flatten() for v in state.values()]).double().numpy()  # noqa: E731
    dim = flat(start).size
    template = distributed.DistributedDpParams(clip=1.0, dim=dim, scale=1.0, bits=bits,
                                               share_variance=0.0, count_share_variance=0.0,
                                               threshold=distributed_ledger.noise_threshold(0.8, clients))
    params = distributed.choose_scale(template, 6.3, clients / 20, clients)
    enc = discrete.round_encoding(params, params.clip, SEED, 1)
    rng = np.random.default_rng(0)
    train_s, encode_s = [], []
    for _ in range(reps):
        net.load_state_dict(start)
        t0 = time.perf_counter()
        task.train(net, loader, epochs, 0.05, device="cpu")
        t1 = time.perf_counter()
        delta = flat(net.state_dict()) - flat(start)
        t2 = time.perf_counter()
        share = skellam.noise_share(params.padded_dim, params.share_variance)  # the CSPRNG
        count = int(skellam.noise_share(1, params.count_share_variance)[0])
        discrete.pack(discrete.encode(delta, 1, enc, rng, share, count), bits)  # the wire
        t3 = time.perf_counter()
        train_s.append(t1 - t0)
        encode_s.append(t3 - t2)
    train, encode = statistics.median(train_s), statistics.median(encode_s)
    return {"dim": dim, "train": train, "encode": encode, "ratio": encode / train,
            "bytes": params.bytes_per_client}


def noise_table(population, clients, rounds, delta, epsilon, fraction, bits_list, dim,
                sampling="poisson", z_central=None):
    """One row per b: central z (calibrated unless given; the app's headline accountant for
    `sampling`) against the distributed z at t = fraction * m survivors."""
    q = clients / population
    if z_central is None:
        z_central = calibration.calibrate_noise(epsilon, delta, rounds, population, clients,
                                                sampling, "pld" if sampling == "poisson" else "rdp")
    split = mechanism.split_noise(z_central, clients)
    t = distributed_ledger.noise_threshold(fraction, clients)
    rows = []
    for bits in bits_list:
        row = {"bits": bits, "t": t, "z_central_update": split.update_noise_multiplier}
        for name, rate in (("sampled", q), ("client", None)):
            # the app's one calibration: the scale depends on z (noise fills the modulus),
            # z on B / gamma C
            plan = distributed_ledger.calibrate(epsilon, delta, rounds, sampling, rate, None,
                                                dim, bits, t, clients, clients)
            params, z = plan.params, plan.split.update_noise_multiplier
            inflation = params.l2_sensitivity / (params.scale * params.clip)
            std_all = (clients * params.share_variance) ** 0.5 / params.scale
            row[name] = {"z_at_t": z, "scale": params.scale, "inflation": inflation,
                         "std_ratio_all_survive": std_all / split.update_noise_multiplier,
                         "bytes": params.bytes_per_client}
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="2410,62006")
    parser.add_argument("--bits", default="16,20")
    parser.add_argument("--population", type=int, default=1437)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epsilons", default="4,2")
    parser.add_argument("--thresholds", default="0.5,0.8")
    parser.add_argument("--sampling", default="poisson,fixed")
    parser.add_argument("--train", action="store_true",
                        help="also time the client's encoding against its training (torch), "
                             "interleaved: digits-mlp on 1 image, 1 epoch (the recipes) and on "
                             "180 images, 5 epochs; lenet on 600, 1")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f} (1 min)")
    print("part 1: client stages and server decode, median seconds")
    for dim in _ints(args.dims):
        for bits in _ints(args.bits):
            r = time_stages(dim, bits, args.clients, args.reps)
            print(f"  d={dim:>7} b={bits}: rotate {r['rotate']*1e3:7.2f} ms  round {r['round']*1e3:7.2f}"
                  f" ms  noise {r['noise']*1e3:7.2f} ms  mod {r['modulus']*1e3:6.2f} ms  "
                  f"encode total {r['encode']*1e3:7.2f} ms  decode {r['decode']*1e3:7.2f} ms  "
                  f"upload {r['bytes']} B (float32: {4 * (dim + 1)} B, 64-bit SecAgg: {8 * (dim + 1)} B)")
    if args.train:
        print(f"client overhead: training (task.train) vs the DP encoding of its update "
              f"(CSPRNG share + encode), interleaved, medians of {args.reps}, "
              f"b={_ints(args.bits)[-1]}, m={args.clients}")
        for model, images, epochs in TRAINING_CASES:
            r = time_overhead(model, images, epochs, _ints(args.bits)[-1], args.clients,
                              args.reps)
            print(f"  {model} d={r['dim']}, {images} image(s) x {epochs} epoch(s): training "
                  f"{r['train'] * 1e3:8.2f} ms, encoding {r['encode'] * 1e3:7.2f} ms = "
                  f"{100 * r['ratio']:5.1f}% of training  (load {os.getloadavg()[0]:.2f})")
    print(f"part 2: noise for N={args.population}, m={args.clients}, T={args.rounds}, "
          f"delta={args.delta}, d={_ints(args.dims)[0]}")
    grid = itertools.product(args.sampling.split(","), _floats(args.epsilons),
                             _floats(args.thresholds))
    for sampling, epsilon, fraction in grid:
        for row in noise_table(args.population, args.clients, args.rounds, args.delta, epsilon,
                               fraction, _ints(args.bits), _ints(args.dims)[0], sampling):
            s, c = row["sampled"], row["client"]
            print(f"  {sampling} eps={epsilon} t={row['t']} b={row['bits']}: central z_update "
                  f"{row['z_central_update']:.3f} | amplified: z(t) {s['z_at_t']:.3f}, B/gC "
                  f"{s['inflation']:.4f}, noise std vs central (all survive) "
                  f"{s['std_ratio_all_survive']:.2f}x | client bound: z(t) {c['z_at_t']:.3f}, "
                  f"noise std vs central {c['std_ratio_all_survive']:.2f}x")

if __name__ == "__main__":
    main()
