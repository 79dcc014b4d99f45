"""The LightningModule that trains any base classifier under any objective."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import lightning.pytorch as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mixrobust.attacks import PGD
from mixrobust.checkpoint import CHECKPOINT_KEY, make_record, optimizer_spec
from mixrobust.models import ImageClassifier
from mixrobust.runtime.seeds import mixed_seed
from mixrobust.threat import Threat
from mixrobust.training.objectives import GaussianNoise, Objective


class ClassifierModule(L.LightningModule):
    """Trains `model` with `objective`; validates clean accuracy plus the objective's robustness metric.

    - robust objectives (pgd_at, trades): `val/robust_acc` under PGD-`val_attack_steps`, and
      `test/robust_acc` under PGD-`test_attack_steps` (no random start), both in the configured threat;
    - gaussian_noise: `val/noise_acc` / `test/noise_acc`, accuracy on x + N(0, sigma^2 I) with seeded noise.

    Adversarial validation needs gradients, so the Trainer must run with ``inference_mode=False``.
    Validation and test run with autocast off (as the sweep's judgements do): under a mixed precision
    (``bf16-mixed``) only training is in bf16, and no reported or model-selecting accuracy comes from a bf16
    search judged in bf16. A ``*-true`` half precision casts the weights themselves (train.py warns).
    The best checkpoint is chosen on ``val/selection``: the objective's main metric (`objective.monitor`),
    ties broken by the lower clean validation cross-entropy (weight 1e-6, capped at 1e-5: below one example
    of accuracy on any validation set under 100,000 images), so a small validation set that saturates
    early does not freeze the choice at the first epoch that reaches 100%.
    The checkpoint carries a self-describing record (see `mixrobust.checkpoint`), the optimizer's included, and
    `data_split` (``{"seed", "val_size"}``: which training images validation held out).

    Randomness: every training batch re-seeds torch's generators (`step_seed`: mixed from `seed`, the
    rank, the epoch and the batch index), so the random starts of adversarial training, the training
    noise and dropout of a batch are the same whether the run started at epoch 0 or resumed from a
    checkpoint; with the data module's per-epoch augmentation generator this makes a resumed run
    repeat the uninterrupted one exactly (on the CPU).
    """

    def __init__(
        self,
        model: ImageClassifier,
        objective: Objective,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        threat: Threat | None = None,
        val_attack_steps: int = 10,
        test_attack_steps: int = 20,
        seed: int = 0,
        channels_last: bool = False,
        data_name: str | None = None,
        data_split: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.threat = threat or getattr(objective, "threat", None)
        self.seed = int(seed)
        self.channels_last = channels_last
        self.data_name, self.data_split = data_name, data_split
        k = model.num_classes
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{kind}": MulticlassAccuracy(num_classes=k, average="micro")
                for stage in ("train", "val", "test")
                for kind in ("acc", "robust_acc", "noise_acc")
            }
        )
        self.val_loss = MeanMetric()
        if objective.robust:
            self.val_attack = PGD.from_threat(self.threat, steps=val_attack_steps, random_start=False, seed=seed)
            self.test_attack = PGD.from_threat(self.threat, steps=test_attack_steps, random_start=False, seed=seed)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def step_seed(self, batch_idx: int) -> int:
        """The seed of a training batch: `mixed_seed` of `seed`, the global rank, the epoch and the batch
        index (not the optimizer step, which gradient accumulation repeats across micro-batches)."""
        return mixed_seed("train-batch", self.seed, self.global_rank, self.current_epoch, batch_idx)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        torch.manual_seed(self.step_seed(batch_idx))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, logits, logs = self.objective(self.model, self._prepare(x), y)
        self.metrics["train_acc"](logits.argmax(1), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.metrics["train_acc"], on_step=False, on_epoch=True)
        for key, value in logs.items():
            self.log(f"train/{key}", value)
        return loss

    def _evaluate(self, batch, batch_idx: int, stage: str) -> None:
        with torch.autocast(batch[0].device.type, enabled=False):  # float32 even under bf16-mixed (class doc)
            self._evaluate_float32(batch, batch_idx, stage)

    def _evaluate_float32(self, batch, batch_idx: int, stage: str) -> None:
        x, y = batch
        x = self._prepare(x)
        with torch.no_grad():
            logits = self.model(x)
        self.metrics[f"{stage}_acc"](logits.argmax(1), y)
        self.log(f"{stage}/acc", self.metrics[f"{stage}_acc"], prog_bar=True)
        if stage == "val":
            self.val_loss.update(F.cross_entropy(logits.float(), y, reduction="none"))
            self.log("val/loss", self.val_loss)
        if self.objective.robust:
            attack = self.val_attack if stage == "val" else self.test_attack
            with torch.enable_grad():
                x_adv = attack(self.model, x, y)
            with torch.no_grad():
                pred = self.model(x_adv).argmax(1)
            self.metrics[f"{stage}_robust_acc"](pred, y)
            self.log(f"{stage}/robust_acc", self.metrics[f"{stage}_robust_acc"], prog_bar=True)
        if isinstance(self.objective, GaussianNoise):
            gen = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + batch_idx)
            noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            with torch.no_grad():
                pred = self.model(x + self.objective.sigma * noise).argmax(1)
            self.metrics[f"{stage}_noise_acc"](pred, y)
            self.log(f"{stage}/noise_acc", self.metrics[f"{stage}_noise_acc"], prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        main = self.metrics[self.objective.monitor.replace("/", "_")].compute()
        self.log("val/selection", main - 1e-6 * self.val_loss.compute().clamp(max=10.0))

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, batch_idx, "test")

    @staticmethod
    def make_scheduler(factory, optimizer: torch.optim.Optimizer, total_steps: int) -> dict:
        """Lightning's scheduler config from a scheduler factory: one-cycle style schedules (whose
        `total_steps` the config leaves to the Trainer) step every batch over `total_steps`, others every epoch."""
        if _needs_total_steps(factory):
            return {"scheduler": factory(optimizer, total_steps=total_steps), "interval": "step"}
        return {"scheduler": factory(optimizer), "interval": "epoch"}

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": self.make_scheduler(self.scheduler_factory, optimizer, total)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainer = self._trainer
        optimizers = trainer.optimizers if trainer is not None else []
        checkpoint[CHECKPOINT_KEY] = make_record(self.model, self.objective, self.threat, self.data_name,
                                                 optimizer=optimizer_spec(optimizers[0]) if optimizers else None,
                                                 max_epochs=trainer.max_epochs if trainer is not None else None,
                                                 split=self.data_split)


def _needs_total_steps(factory) -> bool:
    """A partial scheduler (e.g. OneCycleLR) whose `total_steps` the config leaves to the Trainer."""
    func = getattr(factory, "func", factory)
    keywords = getattr(factory, "keywords", {})
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return "total_steps" in params and keywords.get("total_steps") is None
