"""OmegaConf resolvers used by the configs (registered on import of `mixrobust`)."""

from __future__ import annotations

from omegaconf import OmegaConf


def register_resolvers() -> None:
    """``${mr.mul_int:a,b}`` = int(a * b), e.g. LR milestones as fractions of max_epochs."""
    if not OmegaConf.has_resolver("mr.mul_int"):
        OmegaConf.register_new_resolver("mr.mul_int", lambda a, b: int(float(a) * float(b)))
