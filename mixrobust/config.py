"""OmegaConf resolvers used by the configs (registered on import of `mixrobust`)."""

from __future__ import annotations

from omegaconf import OmegaConf


def gpu_count() -> int:
    """Number of visible CUDA devices, at least 1 (``${mr.gpu_count:}``, e.g. joblib's n_jobs).

    ``torch.cuda.device_count()`` asks NVML first, so it does not initialise CUDA in the
    launching process (which would make forked children unable to use the GPU).
    """
    import torch

    return max(1, int(torch.cuda.device_count()))


def register_resolvers() -> None:
    """Register the ``mr.*`` resolvers (idempotent).

    ``${mr.mul_int:a,b}`` = int(a * b), e.g. LR milestones as fractions of max_epochs;
    ``${mr.gpu_count:}`` = max(1, number of visible CUDA devices), e.g. one local job per GPU.
    """
    if not OmegaConf.has_resolver("mr.mul_int"):
        OmegaConf.register_new_resolver("mr.mul_int", lambda a, b: int(float(a) * float(b)))
    if not OmegaConf.has_resolver("mr.gpu_count"):
        OmegaConf.register_new_resolver("mr.gpu_count", gpu_count)
