"""Long-term identity keys: what a lying server cannot forge.

Each client signs, with its own Ed25519 identity key, (1) its public keys for
each round, committed in advance at its enrolment (`round_keys`), and (2) the
survivor set it is shown in the consistency round, as a set of round keys
(Bonawitz et al. CCS 2017, the actively secure variant; Bell et al. CCS 2020).
Its neighbours check those signatures before they use the keys or hand over
any share. The signatures only help if a client learns its neighbours'
*verification* keys from somewhere other than the server:

- pinned (deployment): every member holds the same key list, a JSON object
  {"member name": "<base64 raw Ed25519 public key>"}, exchanged out of band
  (for example with the data-sharing agreement) and pinned in node-config
  `secagg-pinned-keys`; node-config `secagg-identity-key` is the member's own
  PEM private key. The server only says which member sits at which index; a
  key it made up is in no one's list, and it cannot sign for a listed member.
- relayed (simulation, or a node without a pinned list): the key is generated
  by the node and handed to its neighbours by the server. This stops nothing a
  lying server does (it can relay keys of its own); it protects against an
  honest-but-curious server only, and the app says so.

Signed messages carry a domain tag, the run (session), the round and the
signer's identity name, never the per-round index the server assigns: a
signature cannot be replayed into another run, round, identity or stage. The
survivor set is signed as the survivors' round keys, each bound to one identity
by such a signature, so one signed set names the same clients for every verifier,
whatever indices the server shows each of them.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)

DOMAIN = b"dpfl_app secagg v2"  # v2: keys committed per round, bound to names


class IdentityError(Exception):
    """A key file or pinned list is unusable, or a name is not a pinned member."""


def _frame(*parts: bytes | int | str) -> bytes:
    out = [DOMAIN]
    for part in parts:
        part = part.encode("utf-8") if isinstance(part, str) else part
        # 16 signed bytes: Flower's run ids are unsigned 64-bit (half of them >= 2**63).
        data = part if isinstance(part, bytes) else int(part).to_bytes(16, "big", signed=True)
        out.append(struct.pack(">I", len(data)) + data)
    return b"".join(out)


def round_keys_message(session: int, round_id: int, name: str, c_pk: bytes,
                       s_pk: bytes) -> bytes:
    """What a client signs at enrolment, per round: its two public keys for this run,
    round and identity name (not its index: the server assigns that per round)."""
    return _frame(b"round-keys", session, round_id, name, c_pk, s_pk)


def survivors_message(session: int, round_id: int, survivors: list[bytes]) -> bytes:
    """What a client signs in the consistency round: the survivor set U3 it was shown, as
    the survivors' masking public keys of the round (each signed by one identity for this
    round), so that the signed set means the same clients to every verifier."""
    return _frame(b"survivors", session, round_id, *sorted(survivors))


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def private_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


class Identity:
    """This client's signing key and, when pinned, the federation's verification keys."""

    def __init__(self, key: Ed25519PrivateKey, pinned: dict[str, bytes] | None = None) -> None:
        self.key = key
        self.public = public_bytes(key)
        self.pinned = pinned
        if pinned is None:
            self.name = "relayed:" + base64.b16encode(self.public[:8]).decode().lower()
        else:
            names = [n for n, pk in pinned.items() if pk == self.public]
            if len(names) != 1:
                raise IdentityError("this node's identity key is not (exactly once) in the "
                                    "pinned key list")
            self.name = names[0]

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def verification_key(self, name: str, relayed: bytes) -> bytes:
        """The key to check `name`'s signatures with: the pinned one, else the relayed one."""
        if self.pinned is None:
            return relayed
        if name not in self.pinned:
            raise IdentityError(f"{name!r} is not a member of the pinned key list")
        return self.pinned[name]

    @staticmethod
    def valid(public: bytes, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise IdentityError(f"secagg-identity-key={path}: not a readable unencrypted PEM "
                            f"private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"secagg-identity-key={path}: must be an Ed25519 key")
    return key


def load_pinned_keys(path: str | Path) -> dict[str, bytes]:
    """{"name": "<base64 raw Ed25519 public key>", ...} -> {name: 32 raw bytes}."""
    try:
        listed = json.loads(Path(path).read_text(encoding="utf-8"))
        keys = {str(name): base64.b64decode(value, validate=True)
                for name, value in listed.items()}
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise IdentityError(f"secagg-pinned-keys={path}: expected a JSON object of member "
                            f"name -> base64 Ed25519 public key ({error})") from None
    if not keys or any(len(k) != 32 for k in keys.values()) or \
            len(set(keys.values())) != len(keys):
        raise IdentityError(f"secagg-pinned-keys={path}: every key must be a distinct "
                            "32-byte Ed25519 public key")
    return keys


def pinned_entry(name: str, key: Ed25519PrivateKey) -> dict[str, str]:
    """The pinned-list entry of a member (what it hands to the federation)."""
    return {name: base64.b64encode(public_bytes(key)).decode()}
