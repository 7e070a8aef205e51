from __future__ import annotations

import base64
import json
import subprocess
import sys
from typing import Any

import pytest

from noetl_worker.sealed import SealedEnvelopeError, SealingKey, open_envelope, seal

PLAINTEXT = b'{"id": "1", "name": "pg", "type": "postgres", "data": {"db_password": "x"}}'


def test_round_trip() -> None:
    key = SealingKey.generate()
    envelope = seal(key.public_key_b64(), PLAINTEXT)
    assert set(envelope) == {"alg", "v", "eph_pub", "ciphertext"}
    assert len(base64.b64decode(envelope["eph_pub"])) == 32
    assert open_envelope(key, envelope) == PLAINTEXT


def test_wrong_recipient_fails_authentication() -> None:
    envelope = seal(SealingKey.generate().public_key_b64(), PLAINTEXT)
    with pytest.raises(SealedEnvelopeError, match="another worker"):
        open_envelope(SealingKey.generate(), envelope)


def flip_last_byte(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[-1] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ciphertext": "flip"}, "authentication"),
        ({"eph_pub": "flip"}, "authentication"),
        ({"alg": "aes-gcm"}, "alg must be"),
        ({"v": 2}, "v must be 1"),
        ({"v": True}, "v must be 1"),
        ({"eph_pub": "not base64!"}, "not valid base64"),
        ({"ciphertext": None}, "must be a base64 string"),
        ({"eph_pub": base64.b64encode(b"short").decode()}, "32 bytes"),
    ],
)
def test_broken_envelopes_are_refused(change: dict[str, Any], message: str) -> None:
    key = SealingKey.generate()
    envelope = seal(key.public_key_b64(), PLAINTEXT)
    for field, value in change.items():
        envelope[field] = flip_last_byte(envelope[field]) if value == "flip" else value
    with pytest.raises(SealedEnvelopeError, match=message):
        open_envelope(key, envelope)


def test_seal_rejects_bad_public_key() -> None:
    with pytest.raises(SealedEnvelopeError, match="public key"):
        seal("AAAA", b"x")


@pytest.mark.parametrize("sealed", [False, True])
def test_the_sealing_key_exists_only_with_sealed_credentials_on(sealed: bool) -> None:
    """Off (the default): no key pair, registration carries no public key and cryptography is
    never loaded. On: registration carries the public half of the key credentials are sealed to."""
    code = f"""
import json, sys
from noetl_worker.config import Settings
from noetl_worker.control_plane import ControlPlane
from noetl_worker.metrics import Metrics
from noetl_worker.pipeline import Pipeline
env = {{"NOETL_SEALED_CREDENTIALS": "{str(sealed).lower()}", "WORKER_ID": "w1"}}
settings = Settings.from_env(env)
pipeline = Pipeline.create(settings, Metrics(), environ={{}})
plane = type("Plane", (), {{"settings": settings}})()
runtime = ControlPlane.registration(plane, pipeline.public_key_b64)["runtime"]
print(json.dumps({{"key": runtime.get("worker_public_key"), "crypto": "cryptography" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    if sealed:
        assert seen["crypto"] is True
        assert len(base64.b64decode(seen["key"])) == 32
    else:
        assert seen == {"key": None, "crypto": False}
