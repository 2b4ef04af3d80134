"""Checkpoints never unpickle arbitrary objects: a training-state file that carries an object whose
unpickling would run code is refused with a clear `CheckpointError`, and the code does not run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from visionpoc import checkpoint
from visionpoc.errors import CheckpointError


class Payload:
    """Unpickling this calls `os.mkdir(marker)`: a stand-in for any code an attacker wants to run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.marker),)


def test_a_state_file_with_an_arbitrary_object_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    state = tmp_path / "last_state.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}, "extra": Payload(marker)}, state)
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load_state(state)
    message = str(refused.value)
    assert str(state) in message and "objects other than tensors and plain containers" in message
    assert "refused without unpickling them" in message and "mkdir" in message  # names the culprit
    assert not marker.exists()
    # the file is a real attack: a plain unpickler runs the payload (here, harmlessly, a mkdir)
    torch.load(state, weights_only=False)
    assert marker.is_dir()


def test_a_plain_state_still_loads(tmp_path: Path) -> None:
    state = tmp_path / "last_state.pt"
    checkpoint.save_state(state, {"epoch": 3, "rng": torch.get_rng_state(), "history": [1.0, 0.5]})
    loaded = checkpoint.load_state(state)
    assert loaded["epoch"] == 3 and loaded["history"] == [1.0, 0.5]
    assert torch.equal(loaded["rng"], torch.get_rng_state())
