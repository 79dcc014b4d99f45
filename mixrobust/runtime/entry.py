"""What ``train.py`` and ``evaluate.py`` do first, before anything imports torch.

`prepare` applies the CPU thread policy (`mixrobust.runtime.threads`: it only works before torch
starts its thread pool) and filters the third-party warnings and log lines that say nothing to our
users (`mixrobust.runtime.quiet`). Neither happens on ``import mixrobust``: a library user keeps
their own thread settings and every warning. Imports no torch (only the standard library and, through
``mixrobust/__init__``, omegaconf).
"""

from __future__ import annotations

from mixrobust.runtime.quiet import quiet_third_party
from mixrobust.runtime.threads import apply_thread_policy


def prepare() -> None:
    """Set up an entry point's process: thread policy, then the quiet console."""
    apply_thread_policy()
    quiet_third_party()
