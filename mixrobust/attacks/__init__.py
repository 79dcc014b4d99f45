"""Attacks in pixel space: ``attack(model, x, y) -> x_adv`` (see `mixrobust.attacks.pgd`)."""

from mixrobust.attacks.apgd import APGD, AdaptiveMixAttack
from mixrobust.attacks.autoattack import AutoAttack, find_implementation
from mixrobust.attacks.batched import Attack, attack_chunks, attack_in_batches, model_device
from mixrobust.attacks.losses import LOSSES, AttackLoss, attack_loss, cross_entropy_loss, margin_loss
from mixrobust.attacks.pgd import AUTOCAST_DTYPES, FGSM, PGD, check_finite, eval_mode, parse_autocast_dtype

__all__ = [
    "APGD",
    "AUTOCAST_DTYPES",
    "AdaptiveMixAttack",
    "AutoAttack",
    "LOSSES",
    "FGSM",
    "PGD",
    "Attack",
    "AttackLoss",
    "attack_chunks",
    "attack_in_batches",
    "attack_loss",
    "check_finite",
    "cross_entropy_loss",
    "eval_mode",
    "find_implementation",
    "margin_loss",
    "model_device",
    "parse_autocast_dtype",
]
