"""Sealed credential delivery: the server encrypts a credential to the worker.

``X25519(worker static secret, ephemeral public) → HKDF-SHA256(no salt, info
"noetl-sealed-v1", 44 bytes) = 32-byte key + 12-byte nonce → ChaCha20-Poly1305`` with a fixed
AAD. Envelope: ``{"alg", "v": 1, "eph_pub": base64(32 bytes), "ciphertext": base64}`` (standard
base64 with padding). Every way an envelope can be wrong raises :class:`SealedEnvelopeError`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Final

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import WorkerError

ALG: Final = "x25519-hkdf-sha256-chacha20-poly1305"
VERSION: Final = 1
INFO: Final = b"noetl-sealed-v1"
AAD: Final = f"{ALG}|v={VERSION}".encode()


class SealedEnvelopeError(WorkerError):
    """A sealed envelope cannot be opened (always terminal: retrying cannot fix it)."""


def _derive(shared: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=None, info=INFO).derive(shared)
    return okm[:32], okm[32:]


def _b64decode(envelope: Mapping[str, Any], field: str) -> bytes:
    value = envelope.get(field)
    if not isinstance(value, str):
        raise SealedEnvelopeError(f"sealed envelope field {field!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SealedEnvelopeError(f"sealed envelope field {field!r} is not valid base64") from None


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@attrs.frozen
class SealingKey:
    """The worker's static X25519 key; its public half is given to the server."""

    _private: X25519PrivateKey = attrs.field(repr=False)

    @classmethod
    def generate(cls) -> SealingKey:
        return cls(X25519PrivateKey.generate())

    def public_key_b64(self) -> str:
        return base64.b64encode(_raw_public(self._private.public_key())).decode()

    def secret_bytes(self) -> bytes:
        """The raw private key: only for the scrubber, which must recognise it if it leaks."""
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def exchange(self, peer_public: bytes) -> bytes:
        return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))


def open_envelope(key: SealingKey, envelope: Mapping[str, Any]) -> bytes:
    """The plaintext (credential JSON bytes) of a sealed envelope addressed to ``key``."""
    if not isinstance(envelope, Mapping):
        raise SealedEnvelopeError("sealed envelope must be a JSON object")
    if envelope.get("alg") != ALG:
        raise SealedEnvelopeError(f"sealed envelope alg must be {ALG!r}, got {envelope.get('alg')!r}")
    version = envelope.get("v")
    if version != VERSION or isinstance(version, bool):
        raise SealedEnvelopeError(f"sealed envelope v must be {VERSION}, got {version!r}")
    eph_pub = _b64decode(envelope, "eph_pub")
    if len(eph_pub) != 32:
        raise SealedEnvelopeError(f"sealed envelope eph_pub must be 32 bytes, got {len(eph_pub)}")
    ciphertext = _b64decode(envelope, "ciphertext")
    try:
        shared = key.exchange(eph_pub)
    except ValueError as exc:  # e.g. a low-order point giving an all-zero secret
        raise SealedEnvelopeError(f"sealed envelope eph_pub is unusable: {exc}") from None
    cipher_key, nonce = _derive(shared)
    try:
        return ChaCha20Poly1305(cipher_key).decrypt(nonce, ciphertext, AAD)
    except InvalidTag:
        raise SealedEnvelopeError(
            "sealed envelope failed authentication (tampered, or sealed for another worker)"
        ) from None


def seal(public_key_b64: str, plaintext: bytes) -> dict[str, Any]:
    """Seal ``plaintext`` to a worker's public key (the server's side; used by the stub)."""
    try:
        recipient = X25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise SealedEnvelopeError(f"recipient public key is not 32 base64 bytes: {exc}") from None
    ephemeral = X25519PrivateKey.generate()
    cipher_key, nonce = _derive(ephemeral.exchange(recipient))
    ciphertext = ChaCha20Poly1305(cipher_key).encrypt(nonce, plaintext, AAD)
    return {
        "alg": ALG,
        "v": VERSION,
        "eph_pub": base64.b64encode(_raw_public(ephemeral.public_key())).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }
