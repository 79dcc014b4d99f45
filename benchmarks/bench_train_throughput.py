"""Training throughput through the Lightning Trainer, end to end with data loading (images/s).

    python benchmarks/bench_train_throughput.py --data-root /path/with/CIFAR10 --trainer gpu \
        --objective standard --epochs 12
    python benchmarks/bench_train_throughput.py ... --objective pgd_at --steps 10 --epochs 4

Builds the run exactly as ``train.py`` would (`mixrobust.pipelines.train.settings`: same configs,
in-memory loader with on-device crop/flip, bf16 and channels_last from the ``gpu`` trainer preset),
skips validation, and times every training epoch after the first `--warmup` ones (compilation,
cuDNN autotuning, first transfer). Prints images/s and, with ``--reference``, the ratio to a reference figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import mixrobust  # noqa: F401  (config resolvers)
from mixrobust.pipelines import train

CONF = str(Path(__file__).resolve().parents[1] / "conf")


class EpochTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []
        self.images: list[int] = []

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module):
        self._sync(pl_module)
        self._start, self._count = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._count += batch[1].shape[0]

    def on_train_epoch_end(self, trainer, pl_module):
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)
        self.images.append(self._count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="cifar10")
    p.add_argument("--data-root", default=None)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--objective", default="standard")
    p.add_argument("--steps", type=int, default=10, help="PGD steps for pgd_at / trades")
    p.add_argument("--trainer", default="gpu")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--limit-batches", type=float, default=1.0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--reference", type=float, default=None, help="reference images/s to report a ratio against")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = p.parse_args()

    overrides = [
        f"data={a.data}", f"model={a.arch}", f"objective={a.objective}", f"trainer={a.trainer}",
        f"data.batch_size={a.batch}", f"trainer.max_epochs={a.epochs}", "logger=none",
        "trainer.enable_progress_bar=false", f"trainer.compile={str(a.compile).lower()}", *a.overrides,
    ]
    if a.data_root:
        overrides.append(f"data_root={a.data_root}")
    if a.objective in ("pgd_at", "trades"):
        overrides.append(f"objective.steps={a.steps}")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = "/tmp/mixrobust_bench_train"
    settings = train.settings(cfg)  # every value checked, as train.py does
    L.seed_everything(0)
    module, datamodule = train.build_module(settings), settings.data
    trainer_cfg = {k: v for k, v in settings.trainer_args.items() if k != "_target_"}
    timer = EpochTimer()
    trainer = L.Trainer(
        **trainer_cfg, callbacks=[timer], logger=False, enable_checkpointing=False, inference_mode=False,
        limit_val_batches=0, num_sanity_val_steps=0, limit_train_batches=a.limit_batches,
    )
    trainer.fit(module, datamodule=datamodule)
    rates = [n / t for n, t in zip(timer.images[a.warmup:], timer.times[a.warmup:])]
    rate = statistics.median(rates)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and trainer_cfg["accelerator"] == "gpu" else "cpu"
    print(f"train throughput  {a.arch} {a.objective}{f' PGD-{a.steps}' if a.objective != 'standard' else ''}"
          f"  batch {a.batch}  precision {trainer_cfg.get('precision')}  channels_last {cfg.trainer.channels_last}"
          f"  compile {a.compile}  on {device}: {rate:,.0f} images/s (median of {len(rates)} epochs, "
          f"{timer.images[-1]} images each)")
    if a.reference:
        print(f"  ratio to reference {a.reference:,.0f} images/s: {rate / a.reference:.3f}")


if __name__ == "__main__":
    main()
