"""Sealed states (SPEC §10): what the connect flow hands a browser comes back encrypted and authenticated.

`TVM_STATE_KEYS` is a ring of secrets: the first seals, every one opens, so keys rotate without breaking
flows in progress, and any process holding the same keys opens what another sealed. Sealing is
cryptography's Fernet (AES-128-CBC + HMAC-SHA256, with a timestamp for the time limit) under MultiFernet,
each Fernet key derived from a secret with HKDF for one purpose, so a value sealed for one use (a sign-in
state, a cookie) cannot be replayed as another.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAX_SEALED = 8192  # characters: anything longer did not come from us


class StateRejected(Exception):
    """A sealed value was tampered with, sealed under a key we do not hold, for another purpose, or too old."""


def generate_keys() -> tuple[bytes, ...]:
    """One fresh secret (a process that has no TVM_STATE_KEYS: its flows cannot move to another process)."""
    return (os.urandom(32),)


class Sealer:
    """Seals JSON objects for one `purpose`; opens them within a time limit. Raises StateRejected."""

    def __init__(self, keys: Sequence[bytes], purpose: str) -> None:
        if not keys:
            raise ValueError("a sealer needs at least one key")
        self.purpose = purpose
        self._ring = MultiFernet([Fernet(_derive(key, purpose)) for key in keys])

    def seal(self, payload: dict[str, Any]) -> str:
        return self._ring.encrypt(json.dumps(payload, separators=(",", ":")).encode()).decode("ascii")

    def open(self, sealed: str, max_age: float) -> dict[str, Any]:
        """The payload of `sealed` if it is ours, for this purpose, and at most `max_age` seconds old."""
        if not sealed or len(sealed) > MAX_SEALED or not sealed.isascii():
            raise StateRejected("malformed")
        try:
            raw = self._ring.decrypt(sealed.encode("ascii"), ttl=max(1, int(max_age)))
        except InvalidToken:
            raise StateRejected("not sealed by these keys, altered, or expired") from None
        payload = json.loads(raw)
        if not isinstance(payload, dict):  # pragma: no cover - only we seal, and only objects
            raise StateRejected("malformed")
        return payload


def _derive(secret: bytes, purpose: str) -> bytes:
    key = HKDF(algorithm=SHA256(), length=32, salt=None, info=b"token-vault-mcp/" + purpose.encode()).derive(secret)
    return base64.urlsafe_b64encode(key)
