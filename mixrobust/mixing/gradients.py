"""R_i(x) of eq. (3): dual norms of input gradients of the mixed quantities, batched over classes.

Per-example gradients come from one backward pass of the batch sum: in eval mode the examples
of a batch are independent, so d(sum_n q[n, k]) / d x[n] = d q[n, k] / d x[n]. Per-class
gradients are batched with ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over
one-hot grad_outputs), which works with BatchNorm in eval mode, in-place ReLU and max-pooling,
and supports ``create_graph=True`` for double backprop. Memory: K copies of the input gradient.
"""

from __future__ import annotations

import torch

from mixrobust.mixing.options import ROption

#: Lower bound on the denominator of the ratio options: R = ||grad g|| / max(||grad h||, R_EPS).
#: A class whose h-gradient vanishes (h flat there) gets a huge R, i.e. almost pure h; when both
#: gradients vanish R = 0, i.e. pure g (eq. (3) with R_i = 0).
R_EPS = 1e-12


def _norms(grads: torch.Tensor, p: float, lead: int) -> torch.Tensor:
    """l_p norm over all but the first `lead` dims: (..., *input) -> (...)."""
    return torch.linalg.vector_norm(grads.flatten(lead), ord=p, dim=lead)


def class_grad_norms(q: torch.Tensor, x: torch.Tensor, p: float, create_graph: bool) -> torch.Tensor:
    """||grad_x q[n, k]||_p for every example n and class k: (N, K) from q (N, K) and x (N, ...)."""
    n, k = q.shape
    if not q.requires_grad:  # q does not depend on x at all
        return q.new_zeros(n, k)
    onehots = torch.eye(k, dtype=q.dtype, device=q.device).unsqueeze(1).expand(k, n, k)  # (K, N, K)
    (grads,) = torch.autograd.grad(
        q, x, grad_outputs=onehots, is_grads_batched=True,
        create_graph=create_graph, retain_graph=True, allow_unused=True,
    )  # (K, N, *input)
    if grads is None:
        return q.new_zeros(n, k)
    return _norms(grads.to(q.dtype), p, 2).transpose(0, 1)  # (N, K)


def max_class_grad_norm(q: torch.Tensor, x: torch.Tensor, p: float, create_graph: bool) -> torch.Tensor:
    """||grad_x max_j q[n, j]||_p: (N, 1). The max is taken at the current argmax (a.e. its gradient)."""
    if not q.requires_grad:
        return q.new_zeros(q.shape[0], 1)
    top = q.gather(1, q.detach().argmax(dim=1, keepdim=True))  # (N, 1)
    (grads,) = torch.autograd.grad(
        top.sum(), x, create_graph=create_graph, retain_graph=True, allow_unused=True
    )  # (N, *input)
    if grads is None:
        return q.new_zeros(q.shape[0], 1)
    return _norms(grads.to(q.dtype), p, 1).unsqueeze(1)  # (N, 1)


def r_values(
    option: ROption,
    qg: torch.Tensor,
    qh: torch.Tensor,
    x: torch.Tensor,
    p: float,
    create_graph: bool,
) -> torch.Tensor | None:
    """R_i(x) for `option`: (N, K) for per-class options, (N, 1) for max-class ones, None for ``one``.

    `qg`, `qh` (N, K) are what is mixed (probabilities or logits), computed from `x` with the
    graph kept; `p` is the dual exponent p*. With `create_graph` the result stays differentiable
    in x (double backprop), otherwise callers should detach it.
    """
    if option is ROption.ONE:
        return None
    if option is ROption.GRAD_G_I:
        return class_grad_norms(qg, x, p, create_graph)
    if option is ROption.GRAD_MAX_G:
        return max_class_grad_norm(qg, x, p, create_graph)
    if option is ROption.GRAD_RATIO:
        num, den = class_grad_norms(qg, x, p, create_graph), class_grad_norms(qh, x, p, create_graph)
    else:  # GRAD_RATIO_MAX
        num, den = max_class_grad_norm(qg, x, p, create_graph), max_class_grad_norm(qh, x, p, create_graph)
    return num / den.clamp_min(R_EPS)
