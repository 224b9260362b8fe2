"""`dpfl`: one command for the tools, as `flwr` is one command for Flower.

    dpfl plan | sweep | audit | baseline | deploy | bench | bench-study | coldstart | secagg-keys | export-data | stop-superlink [options]

Each subcommand is one module's `main(argv)`; it is imported only when asked
for, so `dpfl plan` does not pay for torch. `dpfl SUBCOMMAND --help` shows its
options with their defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with main(argv), one line for the overview)
COMMANDS = {
    "plan": ("dpfl_app.tools.plan", "noise or clients per round for a target (ε, δ), and the ε curve"),
    "sweep": ("dpfl_app.tools.sweep", "run the app over noise levels; table and privacy-utility plots"),
    "audit": ("dpfl_app.tools.audit", "empirical ε from canary clients against the accounted ε"),
    "baseline": ("dpfl_app.tools.baseline", "centralised, non-private baseline of the same model"),
    "deploy": ("dpfl_app.tools.deploy", "a loopback deployment: SuperLink, SuperNodes, TLS, auth"),
    "bench": ("dpfl_app.tools.bench.__main__", "the app against its in-process limit, DP on and off"),
    "bench-study": ("dpfl_app.tools.study.bench", "the study engine against flwr run and pfl-research, per client update"),
    "coldstart": ("dpfl_app.tools.bench.coldstart", "time one cold ClientApp process per message"),
    "secagg-keys": ("dpfl_app.tools.secagg_keys", "identity keys and the pinned list for secure aggregation"),
    "export-data": ("dpfl_app.tools.export_data", "write demo partitions as site folders for data-path"),
    "stop-superlink": ("dpfl_app.tools.stop_superlink", "stop Flower's local SuperLink and its processes, by PID"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep hand-wrapped descriptions, and show each option's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        shown = '""' if default == "" else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dpfl COMMAND [options]   (dpfl COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dpfl: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
