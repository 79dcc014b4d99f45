"""How the Trainer writes and reads checkpoints: atomically, and without unpickling code.

`SafeCheckpointIO` is Lightning's `TorchCheckpointIO` with two changes. Saving writes the whole
checkpoint to a temporary file next to the target and renames it over the target, so a run killed
while saving (a preemption, ``kill -9``) leaves the previous ``last.ckpt`` intact, never half of
one. Loading always uses ``torch.load(weights_only=True)``: resuming from a checkpoint never runs
pickled code (mixrobust's checkpoints are plain data; MultiStepLR's ``collections.Counter`` of
milestones is allowed, `mixrobust.checkpoint.files.SAFE_GLOBALS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mixrobust.checkpoint.files import SAFE_GLOBALS
from mixrobust.runtime.files import atomic_write


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic checkpoint files, loaded with ``weights_only=True`` (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):  # remote stores: Lightning's own
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f), mode="wb")

    def load_checkpoint(self, path, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
