"""Mask expansion: a cryptographic stream keyed by the whole 256-bit secret.

Each mask is the AES-256-CTR keystream of its 32-byte key, read as uint64
words. Flower's `pseudo_rand_gen` folds the seed into 32 bits for numpy's
MT19937 (flwr issue #7522), so its masks have at most 32 bits of entropy; we
never use it. Every key here is used for one mask only (fresh key pairs and
self-mask seeds each round), so the fixed all-zero counter block is safe.

Pairwise keys come from ECDH on the clients' masking key pairs with HKDF-SHA256
(Flower's `generate_shared_key`); the encryption key pairs are separate.
"""

from __future__ import annotations

import base64

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key

KEY_BYTES = 32
_ZERO_COUNTER = bytes(16)


def mask_stream(key: bytes, length: int) -> np.ndarray:
    """`length` uint64 words of AES-256-CTR keystream under `key` (32 bytes)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"mask key must be {KEY_BYTES} bytes, got {len(key)}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def pairwise_key(own: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """The 32-byte key two clients share: HKDF-SHA256 of their ECDH secret."""
    return base64.urlsafe_b64decode(generate_shared_key(own, peer))


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
