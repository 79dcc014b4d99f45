"""Evaluate a mixture: ``python evaluate.py g_ckpt=... h_ckpt=... [task=mix|certify|report|study|fit_map]`` (README)."""

from mixrobust.runtime import entry

entry.prepare()  # before torch is imported: CPU thread policy, third-party noise filtered
import hydra  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg) -> None:
    entry.prepare()  # again: a launcher's worker process (joblib, SLURM) did not run the lines above
    from mixrobust import pipelines  # here, not above: --help needs no torch

    result = pipelines.run(cfg)
    print(result.text())  # the results table; certification: accuracies and the chosen alpha; report: its jobs;
    # fit_map: the fitted map, alpha and estimates
    print(result.output_dir)  # the last line: the folder with the results files


if __name__ == "__main__":
    main()
