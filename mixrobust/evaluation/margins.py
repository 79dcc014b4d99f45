"""Confidence margins (the paper's Table 1): top-1 minus top-2 probability, by outcome.

For g, h and each mixture the margins are summarised on the clean images, split into correctly
and incorrectly classified examples, and on the attacked images (own PGD for g and h, the MIX
PGD images for a mixture) of the examples the model classifies correctly clean, split into
those still classified correctly (robust) and those the attack broke. (Examples already wrong
clean are counted in the clean-incorrect cell only, in line with the counting rule of
`mixrobust.evaluation.outcomes`.) A mixture's probabilities are the softmax of its outputs:
exactly the mixed probabilities for ``r_option=one`` in prob space, their normalisation for
other R_i options, and the softmax of the mixed logits in logit space.
"""

from __future__ import annotations

import numpy as np
import torch


def probability_gap(outputs: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 softmax probability of logits (..., K) -> (...), in float32."""
    top2 = torch.softmax(outputs.float(), dim=-1).topk(2, dim=-1).values  # (..., 2)
    return top2[..., 0] - top2[..., 1]


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"mean": None, "median": None, "n": 0}
    return {"mean": float(values.mean()), "median": float(np.median(values)), "n": int(values.size)}


def margin_summary(gap: np.ndarray, correct: np.ndarray) -> dict:
    """Mean, median and count of `gap` (N,) over correctly and incorrectly classified examples.

    An empty group has mean and median None (JSON null).
    """
    gap, correct = np.asarray(gap, dtype=np.float64), np.asarray(correct, dtype=bool)
    return {"correct": _stats(gap[correct]), "incorrect": _stats(gap[~correct])}

