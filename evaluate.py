"""Evaluate a mixture of two checkpoints: ``python evaluate.py g_ckpt=... h_ckpt=...`` (see README).

``task=mix`` (default) sweeps alpha under clean, STD, ROB and MIX attacks; ``task=certify`` computes
certified radii of the mixture (Theorems 4 and 5); ``task=report report.dir=multirun/...`` combines
the jobs of a sweep into one CSV and figures.
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
