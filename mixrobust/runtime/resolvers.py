"""OmegaConf resolvers used by the configs (registered on import of `mixrobust`)."""

from __future__ import annotations

from omegaconf import OmegaConf


def gpu_count() -> int:
    """Number of visible CUDA devices (`mixrobust.runtime.placement.visible_gpus`), at least 1 (``${mr.gpu_count:}``,
    e.g. joblib's n_jobs)."""
    from mixrobust.runtime.placement import visible_gpus

    return max(1, visible_gpus())


def pgd_step(eps, steps) -> float:
    """PGD step size 2.5 * eps / steps (Madry et al.): the attack can cross the ball and back."""
    return 2.5 * float(eps) / int(steps)


def register_resolvers() -> None:
    """Register the ``mr.*`` resolvers (idempotent).

    ``${mr.mul_int:a,b}`` = int(a * b), e.g. LR milestones as fractions of max_epochs;
    ``${mr.gpu_count:}`` = max(1, number of visible CUDA devices), e.g. one local job per GPU;
    ``${mr.pgd_step:eps,steps}`` = 2.5 * eps / steps, PGD's step size in eps sweeps.
    """
    if not OmegaConf.has_resolver("mr.mul_int"):
        OmegaConf.register_new_resolver("mr.mul_int", lambda a, b: int(float(a) * float(b)))
    if not OmegaConf.has_resolver("mr.pgd_step"):
        OmegaConf.register_new_resolver("mr.pgd_step", pgd_step)
    if not OmegaConf.has_resolver("mr.gpu_count"):
        OmegaConf.register_new_resolver("mr.gpu_count", gpu_count)
