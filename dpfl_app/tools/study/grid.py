"""The settings a sweep runs: noise levels or target epsilons, times a grid of other keys.

    --target-epsilon 1,2,4 --grid "lr=0.05,0.1 server-lr=1,2"  ->  12 settings

A setting is the dict of run-config keys the sweep sets for one run (besides
seed and output-dir); its label names the run in tables and folders.
"""

from __future__ import annotations

import argparse
import itertools
import math
import tomllib


def setting_label(setting: dict) -> str:
    """'noise=0.5' or 'target-epsilon=2 lr=0.1': the keys the sweep sets for a run."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in setting.items())


def toml_overrides(setting: dict) -> str:
    return " ".join(f"{k}={v!r}" if not isinstance(v, bool) else f"{k}={str(v).lower()}"
                    for k, v in setting.items())


GRID_OWNED = ("noise", "target-epsilon", "seed", "output-dir")


def parse_grid(text: str) -> list[dict]:
    """"lr=0.05,0.1 model=digits-mlp,digits-cnn" -> every combination.

    Values are read as TOML scalars; a text key also takes a bare word
    (model=digits-cnn), as it does on the command line. Each value is checked
    against the key's allowed values here, before any run starts.
    """
    from dpfl_app.config import KEYS, check_value
    from dpfl_app.errors import ConfigError

    axes = []
    for item in text.split():
        key, _, values = item.partition("=")
        if key not in KEYS or key in GRID_OWNED or not values:
            raise argparse.ArgumentTypeError(
                f"grid item {item!r}: expected key=v1,v2 with a run-config key other than "
                f"{', '.join(GRID_OWNED)}")
        try:
            axes.append([(key, check_value(key, _scalar(v, KEYS[key].kind)))
                         for v in values.split(",")])
        except (tomllib.TOMLDecodeError, ConfigError) as err:
            raise argparse.ArgumentTypeError(f"grid item {item!r}: {err}") from err
    return [dict(combo) for combo in itertools.product(*axes)]


def _scalar(text: str, kind: type):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if kind is str and text:
            return text
        raise


def settings(args: argparse.Namespace) -> list[dict]:
    """The sweep's settings: each noise (or target epsilon; inf = noise 0) times the grid."""
    levels = ([{"noise": z} for z in args.noise] if args.noise is not None else
              [{"noise": 0.0} if math.isinf(e) else {"target-epsilon": e}
               for e in args.target_epsilon])
    return [{**level, **extra} for level in levels for extra in (args.grid or [{}])]
