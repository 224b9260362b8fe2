"""Identity keys for secure aggregation against a lying server, and the pinned list.

    dpfl secagg-keys new NAME --out DIR      # a member: its private key and public entry
    dpfl secagg-keys pin ENTRY.json ... --out pinned-keys.json   # the members' list

Each member of the federation runs `new` on its own machine: it writes
DIR/NAME.pem (the Ed25519 private key, mode 0600, never shared) and
DIR/NAME.pub.json (its public entry). The members exchange the public entries
out of band (not through the aggregation server, which is what the keys guard
against), every member builds the same list with `pin`, compares its SHA-256
fingerprint with the others, and sets in its SuperNode's node-config:

    secagg-identity-key="DIR/NAME.pem" secagg-pinned-keys="pinned-keys.json"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dpfl_app.secagg.identity import IdentityError, load_pinned_keys, pinned_entry
from dpfl_app.tools.cli import HelpFormatter


def new_member(name: str, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    key_path, entry_path = out / f"{name}.pem", out / f"{name}.pub.json"
    if key_path.exists():
        raise IdentityError(f"{key_path} exists: not overwriting a member's identity key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    entry_path.write_text(json.dumps(pinned_entry(name, key)) + "\n", encoding="utf-8")
    return key_path, entry_path


def pin(entries: list[Path], out: Path) -> str:
    """Merge public entries into one list; returns its SHA-256 fingerprint."""
    merged: dict[str, str] = {}
    for path in entries:
        for name, key in json.loads(path.read_text(encoding="utf-8")).items():
            if name in merged and merged[name] != key:
                raise IdentityError(f"{path}: member {name!r} listed twice with different keys")
            merged[name] = key
    text = json.dumps(dict(sorted(merged.items())), indent=2) + "\n"
    out.write_text(text, encoding="utf-8")
    load_pinned_keys(out)  # the same checks a node makes
    return hashlib.sha256(text.encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpfl secagg-keys", description=__doc__,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    new = sub.add_parser("new", help="a member's identity key and public entry")
    new.add_argument("name")
    new.add_argument("--out", type=Path, default=Path("."))
    merge = sub.add_parser("pin", help="merge public entries into the pinned list")
    merge.add_argument("entries", nargs="+", type=Path)
    merge.add_argument("--out", type=Path, default=Path("pinned-keys.json"))
    args = parser.parse_args(argv)
    try:
        if args.action == "new":
            key_path, entry_path = new_member(args.name, args.out)
            print(f"private key: {key_path} (keep it on this node)\npublic entry: {entry_path}")
        else:
            print(f"{args.out}: {pin(args.entries, args.out)} (SHA-256; compare it with "
                  "every other member's)")
    except (IdentityError, OSError, ValueError) as error:
        print(f"dpfl secagg-keys: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
