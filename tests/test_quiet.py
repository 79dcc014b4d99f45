"""quiet_third_party: the entry points' filter for third-party noise, and only that.

Every filtered warning is raised here with `warnings.warn` from a module named like the one that
raises it in real runs (Lightning's), and must vanish; the same text from any other module, an
unrelated warning and mixrobust's own warnings must come through; and importing mixrobust alone
installs nothing (library users keep every warning).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings

import pytest

from mixrobust.runtime import quiet

# the messages as Lightning 2.6 / torch 2.9 word them, each with its category and the module it comes from
RAISED = [
    ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
     "instead.", FutureWarning, "lightning.pytorch.utilities._pytree"),
    ("The 'train_dataloader' does not have many workers which may be a bottleneck. Consider increasing the value of "
     "the `num_workers` argument` to `num_workers=15` in the `DataLoader` to improve performance.",
     "PossibleUserWarning", "lightning.pytorch.trainer.connectors.data_connector"),
    ("The 'val_dataloader' does not have many workers which may be a bottleneck.", "PossibleUserWarning",
     "lightning.pytorch.trainer.connectors.data_connector"),
    ("The number of training batches (21) is smaller than the logging interval Trainer(log_every_n_steps=50). Set a "
     "lower value for log_every_n_steps if you want to see logs for the training epoch.", "PossibleUserWarning",
     "lightning.pytorch.loops.fit_loop"),
]


def category(name):
    if name == "PossibleUserWarning":
        from lightning.fabric.utilities.warnings import PossibleUserWarning

        return PossibleUserWarning
    return name


def warn_from(module: str, message: str, cat: type[Warning]) -> list[warnings.WarningMessage]:
    """`warnings.warn(message, cat)` called from code whose module is `module`; the warnings that got through."""
    with warnings.catch_warnings(record=True) as caught:
        exec("warnings.warn(message, cat)", {"__name__": module, "warnings": warnings, "message": message, "cat": cat})
    return caught


@pytest.fixture
def quieted():
    """quiet_third_party() inside a warnings context (its warning filters undone after the test), with every
    warning that is not filtered shown ("always"), and its logging changes undone."""
    levels = {name: logging.getLogger(name).level for name in quiet.LOGGER_LEVELS}
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        quiet.quiet_third_party()
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    for name, noise_filter in quiet._FILTERS.items():
        logging.getLogger(name).removeFilter(noise_filter)


@pytest.mark.parametrize("message, cat, module", RAISED)
def test_filters_each_named_warning(quieted, message, cat, module):
    assert warn_from(module, message, category(cat)) == []


@pytest.mark.parametrize("message, cat, module", RAISED)
def test_the_same_text_from_elsewhere_still_shows(quieted, message, cat, module):
    """Only the third-party module that raises it is filtered: our code and tests saying the same come through."""
    for elsewhere in ("mixrobust.pipelines.train", "__main__", "tests.test_quiet"):
        caught = warn_from(elsewhere, message, category(cat))
        assert [str(w.message) for w in caught] == [message], elsewhere


def test_unrelated_and_other_category_warnings_still_show(quieted):
    lightning = "lightning.pytorch.trainer.connectors.data_connector"
    for message, cat in [
        ("Checkpoint directory /x/checkpoints exists and is not empty.", UserWarning),
        ("The 'train_dataloader' does not have many workers which may be a bottleneck.", DeprecationWarning),
        ("`isinstance(treespec, LeafSpec)` is deprecated", UserWarning),  # the message, in another category
        ("something is deprecated", FutureWarning),
    ]:
        assert [str(w.message) for w in warn_from(lightning, message, cat)] == [message], message


def test_mixrobust_own_warnings_still_show(quieted):
    """Our warnings pass untouched: raised by our code, and any category from our modules."""
    from mixrobust.certify.radii import check_alpha

    with warnings.catch_warnings(record=True) as caught:
        check_alpha(0.3)
    assert len(caught) == 1 and "alpha=0.3 < 1/2" in str(caught[0].message)
    for module in ("mixrobust.certify.mixture", "mixrobust.pipelines.train", "mixrobust"):
        for cat in (UserWarning, FutureWarning, RuntimeWarning):
            assert len(warn_from(module, "a warning of ours", cat)) == 1, (module, cat)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_lightning_log_lines_dropped_others_kept(quieted):
    """Lightning's loggers may not propagate to the root (it gives them their own handler), so collect on them."""
    names = ["lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
             "lightning.fabric.utilities.seed"]
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    collect = Collect()
    for lg in loggers:
        lg.addHandler(collect)
        if lg.name.endswith("rank_zero"):
            lg.setLevel(logging.INFO)
    try:
        noise = ["💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://"
                 "pypi.org/project/litlogger/) to enable LitLogger.",
                 "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](https://pypi.org/"
                 "project/litmodels/) to enable LitModelCheckpoint, which syncs automatically with the Lightning "
                 "model registry.",
                 "Loading `train_dataloader` to estimate number of stepping batches.",
                 "TPU available: False, using: 0 TPU cores",
                 "HPU available: False, using: 0 HPUs"]
        kept = ["GPU available: True (cuda), used: True", "`Trainer.fit` stopped: `max_epochs=3` reached.",
                "Restoring states from the checkpoint path at /x/best.ckpt", "TPU available: True, using: 8 TPU cores"]
        for rank_zero in loggers[:2]:
            for message in noise + kept:
                rank_zero.info(message)
        loggers[2].info("Seed set to 0")
        loggers[2].warning("1e99 is not in bounds, numpy accepts from 0")
        assert collect.messages == kept + kept + ["1e99 is not in bounds, numpy accepts from 0"]
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(collect)
            lg.setLevel(level)


def test_calling_twice_installs_each_filter_once(quieted):
    before = list(warnings.filters)
    quiet.quiet_third_party()
    assert warnings.filters == before
    for name, noise_filter in quiet._FILTERS.items():
        assert logging.getLogger(name).filters.count(noise_filter) == 1


def test_every_entry_says_why():
    assert all(len(noise.why) > 40 for noise in quiet.WARNINGS)


def test_import_mixrobust_installs_nothing():
    """A library user keeps every warning and log line: only the entry points call quiet_third_party."""
    code = textwrap.dedent("""
        import logging, warnings
        import mixrobust, mixrobust.runtime.quiet, mixrobust.pipelines
        mixrobust.load_classifier  # the lazy public names, imported
        import lightning.pytorch  # what the tasks import
        ours = {noise.message for noise in mixrobust.runtime.quiet.WARNINGS}
        installed = [f for f in warnings.filters if f[1] is not None and f[1].pattern in ours]
        assert not installed, installed
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
            assert not logging.getLogger(name).filters, name
        assert logging.getLogger("lightning.fabric.utilities.seed").level == logging.NOTSET
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_lightning_lines_reach_the_console_once(monkeypatch):
    """With Hydra's handlers on the root logger, Lightning's own console handler is removed (its lines would
    show twice); any other handler stays; without root handlers nothing changes."""
    import lightning

    from mixrobust.runtime.quiet import lightning_logs_once

    root, logger = logging.getLogger(), logging.getLogger("lightning")
    mine = logging.StreamHandler()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(logger, "handlers", [lightning._console, mine])
    lightning_logs_once()
    assert logger.handlers == [lightning._console, mine]  # nothing else would print Lightning's lines
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler()])
    lightning_logs_once()
    assert logger.handlers == [mine]
