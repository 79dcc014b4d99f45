"""Train a base classifier: ``python train.py objective=pgd_at data=cifar10 model=resnet18`` (see README)."""

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from mixrobust import pipelines


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = pipelines.run(cfg)
    if rank_zero_only.rank == 0:
        print(result.best_checkpoint)  # the last line: the checkpoint to mix, attack and certify
    return result.metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
