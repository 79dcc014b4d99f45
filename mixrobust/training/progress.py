"""Training progress as log lines (`mixrobust.runtime.progress`), for output that is not a terminal.

On a terminal the Trainer shows Lightning's rich progress bar; written to a file, a pipe or CI that
bar draws only its last frame, so `LogProgress` reports instead: a ``training`` stage over every
training batch of the run (epoch, and the last validation metrics, in its detail) and a ``testing``
stage, each a log line at least every ``progress.interval`` seconds with the rate and the ETA.
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from mixrobust.runtime.progress import Stage, stage

#: The validation metrics shown in the training stage's detail, when logged.
SHOWN_METRICS = ("val/acc", "val/robust_acc", "val/noise_acc")


class LogProgress(Callback):
    """Log-line progress of `Trainer.fit` and `Trainer.test` on the global-zero process."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._stage: Stage | None = None

    def _open(self, trainer: L.Trainer, name: str, total: int, unit: str, done: int = 0) -> None:
        self._close()
        if trainer.is_global_zero:
            self._stage = self._stack.enter_context(stage(name, total, unit, done))

    def _close(self, exc: BaseException | None = None) -> None:
        self._stage = None
        if exc is None:
            self._stack.close()
        else:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
        self._stack = contextlib.ExitStack()

    def _detail(self, trainer: L.Trainer) -> str:
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"] if trainer.max_epochs else []
        metrics = dict(trainer.callback_metrics)  # a copy: the timer thread reads it while training writes it
        parts += [f"{k} {float(metrics[k]):.4f}" for k in SHOWN_METRICS if k in metrics]
        return ", ".join(parts)

    # --- fit ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        per_epoch = trainer.num_training_batches
        finite = isinstance(per_epoch, int) and trainer.max_epochs and trainer.max_epochs > 0
        # a resumed run starts where it stopped
        self._open(trainer, "training", per_epoch * trainer.max_epochs if finite else 0, "batches",
                   trainer.current_epoch * per_epoch if finite else 0)
        if self._stage is not None:
            self._stage.detail = lambda: self._detail(trainer)  # read only when a line is written

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._stage is not None:
            self._stage.advance(1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    # --- test --------------------------------------------------------------------------------------
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batches = trainer.num_test_batches
        self._open(trainer, "testing", int(sum(b for b in batches if isinstance(b, int))), "batches")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._stage is not None:
            self._stage.advance(1)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close(exception)
