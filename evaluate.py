"""Sweep the mixture of two checkpoints over alpha. ``python evaluate.py g_ckpt=... h_ckpt=...``; see README."""

import hydra

import mixrobust  # noqa: F401  (registers config resolvers)
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from mixrobust.pipelines import evaluate

    results = evaluate.run(cfg)  # logs the results table
    print(results["output_dir"])  # the last line: the folder with results.csv and the plots


if __name__ == "__main__":
    main()
