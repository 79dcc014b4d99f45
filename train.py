"""Train a base classifier: ``python train.py objective=pgd_at data=cifar10 model=resnet18`` (see README)."""

from mixrobust.runtime import entry

entry.prepare()  # before torch is imported: CPU thread policy, third-party noise filtered
import hydra  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> float | None:
    entry.prepare()  # again: a launcher's worker process (joblib, SLURM) did not run the lines above
    from mixrobust import pipelines  # here, not above: --help needs no torch

    result = pipelines.run(cfg)
    if pipelines.is_rank_zero():
        print(result.best_checkpoint)  # the last line: the checkpoint to mix, attack and certify
    return result.metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
