"""Evaluate a mixture of two checkpoints: ``python evaluate.py g_ckpt=... h_ckpt=...`` (see README).

``task=mix`` (default): alpha sweep under attacks; ``task=certify``: certified radii; ``task=report``.
"""

import hydra
from omegaconf import DictConfig

from mixrobust import pipelines


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    result = pipelines.run(cfg)
    print(result.text())  # the results table; certification: accuracies and the chosen alpha; report: its jobs
    print(result.output_dir)  # the last line: the folder with the results files


if __name__ == "__main__":
    main()
