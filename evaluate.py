"""Evaluate a mixture of two checkpoints: ``python evaluate.py g_ckpt=... h_ckpt=...`` (see README).

``task=mix`` (default) sweeps alpha under clean, STD, ROB and MIX attacks; ``task=certify`` computes
certified radii of the mixture (Theorems 4 and 5), e.g. ``experiment=digits_certify``;
``task=report report.dir=multirun/...`` combines the jobs of a sweep into one CSV and figures.
"""

import hydra
from omegaconf import DictConfig

from mixrobust.errors import check_choice
from mixrobust.launch import placed
from mixrobust.evaluation import format_table
from mixrobust.pipelines import certify, evaluate, report

TASKS = ("mix", "certify", "report")


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    task = check_choice("task", cfg.task, TASKS)
    if task == "report":
        results = report.run(cfg)
    else:
        with placed(cfg, "device"):  # in a local multi-GPU sweep: this job's own GPU
            results = certify.run(cfg) if task == "certify" else evaluate.run(cfg)
        if task == "mix":
            print(format_table(results["rows"]))
    print(results["output_dir"])  # the last line: the folder with the results files


if __name__ == "__main__":
    main()
