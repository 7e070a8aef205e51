"""Sealed credential envelopes as the NoETL server produces them (for ``StubState.sealer``).

Envelope: ``{"alg": "x25519-hkdf-sha256-chacha20-poly1305", "v": 1, "eph_pub", "ciphertext"}``.
X25519(ephemeral secret, worker public key) -> HKDF-SHA256 (no salt, info ``noetl-sealed-v1``)
-> 32-byte key + 12-byte nonce -> ChaCha20-Poly1305 with the AAD below.
"""

from __future__ import annotations

import base64
from typing import Any

SEALED_ALG = "x25519-hkdf-sha256-chacha20-poly1305"
SEALED_VERSION = 1
SEALED_INFO = b"noetl-sealed-v1"
SEALED_AAD = f"{SEALED_ALG}|v={SEALED_VERSION}".encode()


def seal_credential(public_key_b64: str, plaintext: bytes) -> dict[str, Any]:
    """Seal ``plaintext`` for the worker whose X25519 public key is ``public_key_b64``."""
    # cryptography is imported lazily: only sealed-credential tests pay for it.
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    peer = X25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(peer)
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=None, info=SEALED_INFO).derive(shared)
    key, nonce = okm[:32], okm[32:]
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, plaintext, SEALED_AAD)
    eph_pub = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {
        "alg": SEALED_ALG,
        "v": SEALED_VERSION,
        "eph_pub": base64.b64encode(eph_pub).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }
