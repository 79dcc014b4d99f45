"""Train a base classifier. ``python train.py objective=pgd_at data=cifar10 model=resnet18``; see README."""

import hydra

import mixrobust  # noqa: F401  (registers config resolvers)
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from mixrobust.pipelines import train

    metrics = train.run(cfg)
    print(metrics["best_checkpoint"])  # the last line: the checkpoint to mix, attack and certify
    return metrics.get(cfg.get("optimized_metric", "test/acc"))


if __name__ == "__main__":
    main()
