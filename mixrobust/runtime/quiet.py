"""Quiet console for the entry points: third-party warnings and log lines that say nothing to our users.

`quiet_third_party` is called by ``train.py`` and ``evaluate.py`` at startup, never on import of
the package, so a library user of ``mixrobust`` keeps every warning. Each entry below names one
message (a regular expression anchored at its start), the category it is raised with and the
third-party module that raises it, with why it is noise. Nothing that mixrobust itself warns
about is filtered, and nothing that could signal a wrong number: only promotions, deprecations
inside third-party code that our code cannot act on, and performance hints that do not apply to
our in-memory data sets.

This module imports only the standard library: filtering by category uses the built-in base class
(Lightning's ``PossibleUserWarning`` is a ``UserWarning``), so starting an entry point does not pay
for importing Lightning here.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

__all__ = ["LOG_LINES", "LOGGER_LEVELS", "WARNINGS", "NoiseFilter", "lightning_logs_once", "quiet_third_party"]

# Modules the filtered warnings are attributed to (``warnings.warn``'s stacklevel points into them).
_LIGHTNING = r"(lightning|pytorch_lightning|lightning_fabric)(\.|$)"


@dataclass(frozen=True)
class Noise:
    """One warning filtered out: `message` (a regex matched at the message's start), `category` (and its
    subclasses), raised from a module matching `module`; `why` says why our users need not see it."""

    message: str
    category: type[Warning]
    module: str
    why: str


WARNINGS: tuple[Noise, ...] = (
    Noise(r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, _LIGHTNING,
          "torch deprecated LeafSpec; Lightning's own _pytree helper still uses it when it flattens batches and "
          "outputs. Nothing in mixrobust can change it, and it goes away with a newer Lightning."),
    Noise(r"The '\w+' does not have many workers which may be a bottleneck", UserWarning, _LIGHTNING,
          "Lightning's PossibleUserWarning for DataLoaders with fewer than 2 workers. The digits and MNIST data "
          "sets are tensors in memory, read with num_workers=0 on purpose (worker processes would only copy "
          "them); data.num_workers sets it for the data sets read from disk."),
    Noise(r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning, _LIGHTNING,
          "Lightning's PossibleUserWarning when an epoch has fewer batches than trainer.log_every_n_steps: only "
          "the per-step training curve gets fewer points. Every metric we report (validation, test, "
          "metrics.json) is computed per epoch and is unaffected."),
)


#: Lightning's INFO lines that are advertisements or internal details, by the loggers that emit them.
LOG_LINES: dict[str, tuple[str, ...]] = {
    # rank_zero_info goes through whichever of these two loggers Lightning bound last
    "lightning.pytorch.utilities.rank_zero": (
        # promotions of Lightning's cloud products (litlogger, litmodels), printed on every run
        r"💡 Tip: ",
        # how Lightning sizes a schedule (OneCycle's total steps): an internal detail
        r"Loading `train_dataloader` to estimate number of stepping batches",
        # accelerators this project never uses (the GPU line stays: it tells whether a GPU is used)
        r"(TPU|HPU) available: False",
    ),
}
LOG_LINES["lightning.fabric.utilities.rank_zero"] = LOG_LINES["lightning.pytorch.utilities.rank_zero"]

#: Third-party loggers lowered to a level (every record below it dropped).
LOGGER_LEVELS: dict[str, int] = {
    # its one INFO line, "Seed set to <seed>", repeats the job's `seed` setting, which the config
    # (.hydra/config.yaml), run.json and metrics.json record; its warnings (an invalid seed) still show
    "lightning.fabric.utilities.seed": logging.WARNING,
}


class NoiseFilter(logging.Filter):
    """Drops the records whose message starts with one of `patterns` (regular expressions)."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the handler's to report, not ours
            return True
        return self.pattern.match(message) is None


_FILTERS: dict[str, NoiseFilter] = {name: NoiseFilter(patterns) for name, patterns in LOG_LINES.items()}


def quiet_third_party() -> None:
    """Filter the third-party warnings in `WARNINGS`, drop the log lines in `LOG_LINES` and lower the
    loggers in `LOGGER_LEVELS`. For the entry points, at startup; calling it again changes nothing.

    Not called on ``import mixrobust``: library users keep every warning. Warnings filters are
    process-wide (``warnings.catch_warnings`` undoes them); the logging changes stay for the process.
    """
    for noise in WARNINGS:
        warnings.filterwarnings("ignore", message=noise.message, category=noise.category, module=noise.module)
    for name, noise_filter in _FILTERS.items():
        logging.getLogger(name).addFilter(noise_filter)  # added once: addFilter skips a filter already there
    for name, level in LOGGER_LEVELS.items():
        logger = logging.getLogger(name)
        if logger.level < level:  # never make a logger someone raised louder
            logger.setLevel(level)


def lightning_logs_once() -> None:
    """Lightning's top-level package gives the ``lightning`` logger a console handler of its own when it is
    imported (``lightning._console``); imported after Hydra set up logging, its subpackages propagate to the
    root logger too, so every Lightning line ("GPU available", "Restoring states ...") reached the console
    twice. When the root logger has handlers (Hydra's console and the job's log file), remove that one
    handler: the lines then show once, and the log file keeps them. Imports Lightning (every task does)."""
    if not logging.getLogger().handlers:
        return
    import lightning

    console = getattr(lightning, "_console", None)
    if console is not None:
        logging.getLogger("lightning").removeHandler(console)
