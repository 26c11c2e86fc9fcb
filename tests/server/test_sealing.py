"""Sealed states: the first key seals, every key opens, anything altered, foreign, misused or old is refused."""

from __future__ import annotations

import os

import pytest

from server.sealing import Sealer, StateRejected


def test_a_state_sealed_by_one_process_opens_in_another_with_the_same_keys_and_survives_rotation() -> None:
    old, new = os.urandom(32), os.urandom(32)
    sealed = Sealer([old], "connect/x").seal({"l": "link", "n": 1})
    assert Sealer([old], "connect/x").open(sealed, 60) == {"l": "link", "n": 1}
    assert Sealer([new, old], "connect/x").open(sealed, 60) == {"l": "link", "n": 1}  # rotation: old still opens
    with pytest.raises(StateRejected):
        Sealer([new], "connect/x").open(sealed, 60)  # a key we do not hold
    assert "link" not in sealed  # encrypted, not merely signed


@pytest.mark.parametrize("change", ["flip", "purpose", "empty", "huge", "unicode"])
def test_an_altered_or_misused_state_is_refused(change: str) -> None:
    key = os.urandom(32)
    sealed = Sealer([key], "connect/a").seal({"l": "x"})
    sealer = Sealer([key], "connect/b" if change == "purpose" else "connect/a")
    wire = {
        "flip": sealed[:30] + ("A" if sealed[30] != "A" else "B") + sealed[31:],
        "purpose": sealed, "empty": "", "huge": "A" * 10_000, "unicode": "é" + sealed,
    }[change]
    with pytest.raises(StateRejected):
        sealer.open(wire, 60)
