"""Mask expansion: a cryptographic stream keyed by the whole 256-bit secret.

Each mask is the AES-256-CTR keystream of its 32-byte key, read as uint64
words. Flower's `pseudo_rand_gen` folds the seed into 32 bits for numpy's
MT19937 (flwr issue #7522), so its masks have at most 32 bits of entropy; we
never use it. Every key here is used for one mask only (fresh key pairs and
self-mask seeds each round), so the fixed all-zero counter block is safe.

Pairwise keys come from X25519 on the clients' masking key pairs with
HKDF-SHA256 (RFC 7748, RFC 5869); the share-encryption key pairs are separate,
and each use has its own HKDF label. X25519 instead of P-384: one agreement
costs about 0.04 ms instead of 0.8 ms, and the server runs one per (dropout,
neighbour) pair.
"""

from __future__ import annotations

import base64

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
_ZERO_COUNTER = bytes(16)


def mask_stream(key: bytes, length: int) -> np.ndarray:
    """`length` uint64 words of AES-256-CTR keystream under `key` (32 bytes)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"mask key must be {KEY_BYTES} bytes, got {len(key)}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def agreed_key(own: X25519PrivateKey, peer: bytes, label: bytes) -> bytes:
    """32 bytes from HKDF-SHA256 of the X25519 secret of `own` and the raw public key `peer`."""
    secret = own.exchange(X25519PublicKey.from_public_bytes(peer))
    return HKDF(hashes.SHA256(), KEY_BYTES, None, label).derive(secret)


def pairwise_key(own: X25519PrivateKey, peer: bytes) -> bytes:
    """The 32-byte mask key two clients share."""
    return agreed_key(own, peer, b"dpfl_app secagg pairwise mask")


def encryption_key(own: X25519PrivateKey, peer: bytes) -> bytes:
    """The Fernet key (urlsafe base64 of 32 bytes) for the shares one client sends another."""
    return base64.urlsafe_b64encode(agreed_key(own, peer, b"dpfl_app secagg share encryption"))


def new_key_pair() -> tuple[bytes, bytes]:
    """(raw private, raw public) X25519 key pair, 32 bytes each."""
    key = X25519PrivateKey.generate()
    return private_raw(key), public_raw(key)


def private_raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def public_raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def pairwise_sign(own_index: int, peer_index: int) -> int:
    """+1 if own < peer else -1: the pair's masks cancel in the sum."""
    if own_index == peer_index:
        raise ValueError("a client has no pairwise mask with itself")
    return 1 if own_index < peer_index else -1


def add_mask(vector: np.ndarray, key: bytes, sign: int = 1) -> np.ndarray:
    """vector +/- mask_stream(key) modulo 2**64, in place; returns vector."""
    mask = mask_stream(key, vector.size)
    if sign > 0:
        np.add(vector, mask, out=vector)
    else:
        np.subtract(vector, mask, out=vector)
    return vector
