"""`dpfl stop-superlink`: stop Flower's local SuperLink, and what it started, by PID.

Flower 1.42 starts one local SuperLink per machine (127.0.0.1:39091) the first
time a `flwr` command needs it, and has no command to stop it. Stopping it by
name (`pkill -f flower-superlink`) would stop every user's SuperLink on the
machine; this finds the one process listening on the port, checks that it is
a `flower-superlink` of this user, and stops it with its SuperExec and any
`flwr-simulation` still running under it (they run in sessions of their own).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dpfl_app.tools.cli import HelpFormatter
from dpfl_app.tools.federation import stop_tree

LISTEN = "0A"  # TCP state in /proc/net/tcp


def listening_inodes(port: int) -> set[str]:
    """Socket inodes of TCP sockets listening on `port` (IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def listener_pids(port: int) -> list[int]:
    """This user's processes that hold a socket listening on `port`."""
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in wanted for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # gone, or another user's
            continue
    return pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpfl stop-superlink", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", 39091)),
                        help="the local SuperLink's port (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT)")
    args = parser.parse_args(argv)
    pids = [pid for pid in listener_pids(args.port)
            if b"flower-superlink" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    if not pids:
        print(f"no flower-superlink of yours listens on 127.0.0.1:{args.port}")
        return 1
    stopped = stop_tree(pids)
    print(f"stopped the local SuperLink on port {args.port} (pid {pids[0]}) and "
          f"{len(stopped) - len(pids)} process(es) it had started")
    return 0


if __name__ == "__main__":
    sys.exit(main())
