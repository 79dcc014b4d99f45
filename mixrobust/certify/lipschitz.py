"""Local Lipschitz constants of each output of a classifier over an eps-ball, by gradient-norm ascent.

Theorem 4 also holds with local constants valid on an eps-ball around x, for radii up to eps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixrobust.errors import ConfigError
from mixrobust.threat import Norm, batch_norm


def _grad_norms(h_fn, z: torch.Tensor, cls: torch.Tensor, dual: float, create_graph: bool):
    """||grad_z h_{cls[j]}(z_j)||_dual for every copy j of the batch z -> (M,)."""
    out = h_fn(z)  # (M, K)
    picked = out.gather(1, cls[:, None]).sum()
    if not picked.requires_grad:  # h does not depend on its input
        return torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
    (grad,) = torch.autograd.grad(picked, z, create_graph=create_graph)
    return batch_norm(grad, dual)


def _random_start(z: torch.Tensor, eps: float, norm: Norm, generator) -> torch.Tensor:
    if norm is Norm.LINF:
        u = torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return z + eps * (2 * u - 1)
    d = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    d = d / batch_norm(d, 2).clamp_min(1e-12).view(-1, *[1] * (z.dim() - 1))
    u = torch.rand(z.shape[0], generator=generator, device=z.device, dtype=z.dtype)
    radius = eps * u.pow(1.0 / d[0].numel())  # uniform in the l2 ball
    return z + d * radius.view(-1, *[1] * (z.dim() - 1))


def _step_and_project(z, grad, x0, eps: float, step_size: float, norm: Norm, clamp: bool):
    view = (-1, *[1] * (z.dim() - 1))
    if norm is Norm.LINF:
        z = z + step_size * grad.sign()
        z = torch.min(torch.max(z, x0 - eps), x0 + eps)
    else:
        z = z + step_size * grad / batch_norm(grad, 2).clamp_min(1e-12).view(view)
        delta = z - x0
        scale = (eps / batch_norm(delta, 2).clamp_min(1e-12)).clamp(max=1.0)
        z = x0 + delta * scale.view(view)
    return z.clamp(0.0, 1.0) if clamp else z


def local_lipschitz(
    h_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float,
    norm: Norm | str = "l2",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = False,
    clamp: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Estimate, per input and class, max ||grad_x' h_i(x')||_{p*} over ||x' - x||_p <= eps -> (N, K).

    `h_fn` maps (M, C, H, W) to (M, K): pass logits or probabilities, whichever outputs the
    Lipschitz constants are wanted for (Theorem 4 needs those of h's probabilities). `norm` is the
    threat norm p; gradients are measured in its dual p*. The search is PGD-style ascent on the
    gradient norm (double backprop) with `steps` steps of `step_size` (default 2.5 eps / steps),
    run separately for every class: the input is replicated K times, copy (n, i) climbs the
    gradient norm of class i, so all classes share one batched forward/backward of N*K images
    (memory grows with N*K). The largest norm seen at x and at every iterate is returned.
    With ``clamp`` the iterates stay in [0,1] (valid images).

    This is an *estimate*: the maximum found is a lower bound on the true local constant, so a
    Theorem 4 radius computed from it is heuristic, not a guarantee. It is valid at most for radii
    up to eps: clip with ``lipschitz_radius(..., max_radius=eps)``. For piecewise-linear models
    (ReLU logits) the gradient norm is locally constant, so the ascent cannot move and only the
    random start explores the ball. Parameter gradients and the model's mode are not touched;
    put `h_fn`'s model in eval mode yourself.
    """
    norm = Norm.parse(norm)
    eps, steps = float(eps), int(steps)
    if eps < 0 or steps < 0:
        raise ConfigError(f"eps and steps must be >= 0, got eps={eps}, steps={steps}")
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else float(step_size)
    dual = norm.dual
    x0 = x.detach()
    with torch.no_grad():
        k = h_fn(x0[:1]).shape[1]
    n = x0.shape[0]
    x0 = x0.repeat_interleave(k, dim=0)  # (N*K, C, H, W): copy n*K + i follows class i
    cls = torch.arange(k, device=x0.device).repeat(n)  # (N*K,)
    with torch.enable_grad():
        best = _grad_norms(h_fn, x0.clone().requires_grad_(True), cls, dual, False).detach()
        if eps == 0 or steps == 0:
            return best.view(n, k)
        z = _random_start(x0, eps, norm, generator) if random_start else x0.clone()
        if clamp:
            z = z.clamp(0.0, 1.0)
        for _ in range(steps):
            z = z.detach().requires_grad_(True)
            gn = _grad_norms(h_fn, z, cls, dual, True)  # (N*K,)
            best = torch.maximum(best, gn.detach())
            if gn.requires_grad:
                (ascent,) = torch.autograd.grad(gn.sum(), z, allow_unused=True)
            else:
                ascent = None
            if ascent is None:
                ascent = torch.zeros_like(z)
            z = _step_and_project(z.detach(), ascent, x0, eps, step_size, norm, clamp)
        z = z.detach().requires_grad_(True)
        best = torch.maximum(best, _grad_norms(h_fn, z, cls, dual, False).detach())
    return best.view(n, k)
