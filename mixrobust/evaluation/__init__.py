"""Evaluating mixtures of g and h: alpha sweeps under clean, transfer and adaptive attacks.

Importable without Hydra: ``run_sweep(g, h, x, y, alphas=..., attack=PGD(...))`` returns the
per-example outcomes, the Table-1 margins and the pre-flight warnings; `write_results` writes
results.csv/json, outcomes.npz, margins.json and the two figures. `merge_results` joins example
shards, and `write_report` combines the jobs of a Hydra multirun folder. (The cache shared by the
jobs of a sweep is `mixrobust.runtime.cache.DiskCache`.)
"""

from mixrobust.evaluation.margins import margin_summary, probability_gap
from mixrobust.evaluation.options import AttackName, MixOption, mix_options, parse_attacks
from mixrobust.evaluation.outcomes import COLUMNS, Outcomes, aggregate, load_outcomes, save_outcomes
from mixrobust.evaluation.plots import plot_accuracy_vs_alpha, plot_tradeoff
from mixrobust.evaluation.preflight import preflight_warnings, run_preflight
from mixrobust.evaluation.reference import predict_correct, reference_sweep
from mixrobust.evaluation.report import format_table, read_results_csv, rows_to_csv, write_results
from mixrobust.evaluation.multirun import write_report
from mixrobust.evaluation.sweep import SweepResult, merge_results, mix_cached, run_sweep

__all__ = [
    "COLUMNS",
    "AttackName",
    "MixOption",
    "Outcomes",
    "SweepResult",
    "aggregate",
    "format_table",
    "load_outcomes",
    "margin_summary",
    "merge_results",
    "mix_cached",
    "mix_options",
    "parse_attacks",
    "plot_accuracy_vs_alpha",
    "plot_tradeoff",
    "predict_correct",
    "preflight_warnings",
    "probability_gap",
    "read_results_csv",
    "reference_sweep",
    "rows_to_csv",
    "run_preflight",
    "run_sweep",
    "save_outcomes",
    "write_report",
    "write_results",
]
