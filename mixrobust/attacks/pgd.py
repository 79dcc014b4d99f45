"""Projected gradient ascent (Madry et al.) on the input, in pixel space, for l_inf and l_2 threats.

Attack contract (shared by every attack in mixrobust): ``attack(model, x, y) -> x_adv`` where
`model` maps images in [0,1] of shape (N, C, H, W) to (N, K) logits (a mixture's log-probabilities
count as logits). The model is given at call time, so one attack object serves g, h and the
mixture alike. `x_adv` lies in [0,1] and inside the eps-ball around `x`; the model's train/eval
mode (of every submodule) is restored, and parameter ``.grad`` fields are never touched.

Non-finite outputs: a model that returns NaN or inf logits (NaN weights, an overflow under
autocast) has no meaningful scores, so `PGD` raises `NonFiniteError` instead of returning points
chosen by the argmax of NaN rows. `check_finite` does the same check for one batch of outputs
(e.g. a clean pass); `nonfinite_rows` and `raise_if_nonfinite` split it into a sync-free part for
hot loops and one host sync at the end.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import math
import numbers
from collections.abc import Iterator
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from mixrobust.attacks.losses import LOSSES, AttackLoss, attack_loss
from mixrobust.errors import ConfigError, NonFiniteError, check_choice
from mixrobust.threat import Norm, Threat

AutocastDtype = Literal["bfloat16", "float16", "float32"]
AUTOCAST_DTYPES: tuple[str, ...] = get_args(AutocastDtype)

#: The end of every NonFiniteError message: why the run stops and what to look at.
NONFINITE_ADVICE = (
    "its scores would be meaningless: check the checkpoint's weights (NaN?) and its numerics "
    "(e.g. autocast_dtype)"
)


def nonfinite_rows(logits: Tensor) -> Tensor:
    """(N,) bool: which rows of `logits` (N, ...) hold a NaN or an inf. No host sync."""
    return ~torch.isfinite(logits.detach()).flatten(1).all(dim=1)


def raise_if_nonfinite(bad: Tensor, what: str, *, during: str = "") -> None:
    """Raise `NonFiniteError` if any entry of `bad` (N,) bool is set; one host sync.

    Message: "<what> returned NaN or inf outputs on k of N examples<during>; <NONFINITE_ADVICE>",
    e.g. ``what="the model"``, ``during=" during the PGD search"``. Callers that know the model's
    name can catch the error and raise a new one naming it.
    """
    k = int(bad.sum())
    if k:
        raise NonFiniteError(
            f"{what} returned NaN or inf outputs on {k} of {bad.numel()} examples{during}; {NONFINITE_ADVICE}"
        )


def check_finite(logits: Tensor, what: str) -> None:
    """Raise `NonFiniteError` if any row of `logits` (N, K) holds a NaN or an inf; one host sync.

    For a model's clean pass before it is scored: `what` names the model (``"the model"``,
    ``"g"``), and the message reads "<what> returned NaN or inf outputs on k of N examples;
    its scores would be meaningless: check ...". In a loop, accumulate `nonfinite_rows` on the
    device instead and call `raise_if_nonfinite` once at the end.
    """
    raise_if_nonfinite(nonfinite_rows(logits), what)


def parse_autocast_dtype(value: torch.dtype | str | None, key: str = "autocast_dtype") -> torch.dtype | None:
    """Map an autocast setting to a dtype; None and float32 both mean "no autocast" (`key` names it in errors)."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.").lower()
    check_choice(key, name, AUTOCAST_DTYPES)
    return None if name == "float32" else getattr(torch, name)


def _number(name: str, value, *, low: float, integer: bool = False):
    """`value` as an int (if `integer`) or finite float that is >= `low`, else a ConfigError."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"attack.{name} must be an integer >= {low}, got {value!r}")
        value = int(value)
    else:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"attack.{name} must be a number >= {low}, got {value!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"attack.{name} must be finite, got {value}")
    if value < low:
        raise ConfigError(f"attack.{name} must be >= {low}, got {value}")
    return value


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of `model` in eval mode; restore each one's own mode afterwards.

    Restoring per submodule (rather than ``model.train(old)``) keeps deliberately mixed modes,
    e.g. a frozen BatchNorm in eval inside a network in train mode. Restored on exceptions too.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class PGD:
    """Untargeted PGD maximising `loss` within the `norm` ball of radius `eps` around x.

    Each step moves `step_size` along the sign of the input gradient (l_inf) or along the
    per-example unit-l_2 gradient (l_2; a zero gradient gives a zero step), then projects onto
    the ball and clamps to [0,1]. With `random_start` each restart begins at a uniform point of
    the l_inf box, or of the l_2 ball (gaussian direction, radius ``eps * U^(1/d)``); draws come
    from a generator on x's device seeded with `seed`, so equal seeds give identical results
    as far as the model's kernels are deterministic (on CUDA, cuDNN's backward is not unless
    ``torch.use_deterministic_algorithms(True)``); `seed=None` uses torch's global generator.
    Without `random_start` a search starts at x.

    Returned per example: of the points the search visited (every restart's start, iterates and
    final iterate, the last judged by one gradient-free forward pass per restart), a misclassified
    one if there is any, the one with the highest loss among those; an example no visited point
    fools gets its highest-loss point. So an example is never reported robust if a visited point
    fooled the model: on a fixed seed, accuracy can only drop with more steps or restarts, and
    robust accuracy never exceeds clean accuracy without random start. The point is never weaker
    than the final iterate plain PGD returns: it fools the model whenever that one does, with at
    least its loss, and otherwise fools the model or has at least its loss. So a PGD-K training
    example is at least as strong as Madry et al.'s K-th iterate, and a fixed-step search that
    oscillates (e.g. under the margin loss) gives its lowest-margin point, not its last.
    Preferring the highest loss among fooling points keeps the chosen point away from the
    decision boundary, so it still fools the model when re-evaluated at another precision (e.g.
    a bf16 search checked in float32).

    The loss is summed over the batch, so each example's search does not depend on what else
    is in the batch. Losses (``"ce"`` cross-entropy, ``"margin"`` max_{i != y} z_i - z_y) and
    gradients are float32; `autocast_dtype` ("bfloat16"/"float16") runs only the model's
    forward pass under ``torch.autocast`` on x's device type.

    Early exit (``early_exit=True``): each example is decided at the first visited point that the
    model misclassifies, which is returned for it, and the batch shrinks as examples are decided, to
    the sizes of a fixed ladder (`shrink`: a few decided rows stay, ignored, so that tensor sizes repeat
    and the host allocator's heap does not fragment). The attacked model's accuracy is exactly the full
    search's without random start (an example is robust iff no visited point fooled it, and each
    example's search is independent of the batch); with random starts, later restarts draw for fewer
    examples, so it is statistically, not exactly, the same.
    The point returned for a fooled example is its first fooling point, not the highest-loss one: use
    it for the attacked model's accuracy, not as a transfer attack or a training example (the
    default, off, is what training and the sweep's STD / ROB images use). Early exit applies to float32
    searches only: with `autocast_dtype` the search runs in full, since a first fooling point lies on
    the half-precision model's decision boundary and may not fool the float32 model that judges it.

    Works when called under ``torch.no_grad()`` (the search re-enables gradients), but not
    inside ``torch.inference_mode()``, which cannot be undone: that raises a RuntimeError.
    With ``eps == 0``, or ``steps == 0`` without random start, returns a copy of x.

    Raises `NonFiniteError` if the model's logits held a NaN or an inf at any point the search
    evaluated (the message counts the examples concerned): the worst case of such a search would
    be chosen by the argmax of NaN rows. Gradient NaNs of finite outputs are not detected.
    Hot loop: no host syncs; a call has two, the [0,1] range check of x before the search and
    the non-finite check after it (a flag per example accumulated on the device).
    """

    def __init__(
        self,
        norm: Norm | str = "linf",
        *,
        eps: float,
        step_size: float,
        steps: int = 10,
        loss: AttackLoss = "ce",
        random_start: bool = False,
        restarts: int = 1,
        seed: int | None = 0,
        autocast_dtype: torch.dtype | str | None = None,
        early_exit: bool = False,
    ):
        self.norm = Norm.parse(norm)
        self.eps = _number("eps", eps, low=0.0)
        self.step_size = _number("step_size", step_size, low=0.0)
        self.steps = _number("steps", steps, low=0, integer=True)
        self.restarts = _number("restarts", restarts, low=1, integer=True)
        self.loss: AttackLoss = check_choice("attack.loss", loss, LOSSES)
        if not isinstance(random_start, bool):
            raise ConfigError(f"attack.random_start must be true or false, got {random_start!r}")
        self.random_start = random_start
        if self.restarts > 1 and not random_start:
            raise ConfigError(
                f"attack.restarts={self.restarts} needs attack.random_start=true: without a random "
                "start every restart repeats the same deterministic search"
            )
        self.seed = None if seed is None else _number("seed", seed, low=0, integer=True)
        self.autocast_dtype = parse_autocast_dtype(autocast_dtype)
        if not isinstance(early_exit, bool):
            raise ConfigError(f"attack.early_exit must be true or false, got {early_exit!r}")
        self.early_exit = early_exit

    @classmethod
    def from_threat(cls, threat: Threat, steps: int, **kwargs) -> "PGD":
        """PGD with the norm, eps and step size of `threat`; `kwargs` go to the constructor."""
        return cls(threat.norm, eps=threat.eps, step_size=threat.step_size, steps=steps, **kwargs)

    def __repr__(self) -> str:
        dtype = None if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch.")
        return (
            f"{type(self).__name__}(norm={self.norm.value!r}, eps={self.eps:g}, "
            f"step_size={self.step_size:g}, steps={self.steps}, loss={self.loss!r}, "
            f"random_start={self.random_start}, restarts={self.restarts}, seed={self.seed}, "
            f"autocast_dtype={dtype!r}" + (", early_exit=True" if self.early_exit else "") + ")"
        )

    def with_early_exit(self, early_exit: bool = True) -> "PGD":
        """A copy of this attack with `early_exit` set (the sweep: on for MIX, off for the transfer images)."""
        out = copy.copy(self)
        out.early_exit = early_exit
        return out

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        """A fresh generator on `device` seeded with `seed`; None (global RNG) when `seed` is None."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Adversarial examples for images `x` (N, C, H, W) in [0,1] with labels `y` (N,).

        `generator` (on x's device) replaces the seeded one, e.g. to draw successive random
        starts across the chunks of a large set. Raises `NonFiniteError` ("the model returned
        NaN or inf outputs on k of N examples during the PGD search; ...") if a visited point
        gave non-finite logits.
        """
        _check_inputs(x, y)
        x, y = x.detach(), y.detach().long()
        if self.eps == 0 or (self.steps == 0 and not self.random_start) or x.shape[0] == 0:
            return x.clone()
        if generator is None:
            generator = self.make_generator(x.device)
        with eval_mode(model), torch.enable_grad():
            search = self._search_early_exit if self.early_exit and self.autocast_dtype is None else self._search
            x_adv, nonfinite = search(model, x, y, generator)
        raise_if_nonfinite(nonfinite, "the model", during=f" during the {type(self).__name__} search")
        return x_adv

    # --- the search -------------------------------------------------------------------------

    def _search(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> tuple[Tensor, Tensor]:
        """-> (the worst case per example (N, C, H, W), whether a visited point gave non-finite logits (N,))."""
        linf = self.norm is Norm.LINF
        lo = (x - self.eps).clamp_(min=0.0) if linf else None  # (N, C, H, W) feasible box
        hi = (x + self.eps).clamp_(max=1.0) if linf else None
        best = x.clone()  # (N, C, H, W)
        best_loss = torch.full(y.shape, -math.inf, device=x.device)  # (N,)
        best_fooled = torch.zeros(y.shape, dtype=torch.bool, device=x.device)  # (N,)
        nonfinite = torch.zeros(y.shape, dtype=torch.bool, device=x.device)  # (N,) checked by the caller
        x_adv = torch.empty_like(x).requires_grad_(True)  # reused leaf, updated in place
        for _ in range(self.restarts):
            with torch.no_grad():
                self._start(x_adv, x, lo, hi, generator)
            for _ in range(self.steps):
                loss, fooled = self._forward(model, x_adv, y, nonfinite)
                (grad,) = torch.autograd.grad(loss.sum(), x_adv)
                with torch.no_grad():
                    _keep_worst(best, best_loss, best_fooled, x_adv, loss, fooled)
                    self._step(x_adv, grad, x, lo, hi)
            with torch.no_grad():  # the final iterate, judged by one gradient-free forward pass
                loss, fooled = self._forward(model, x_adv, y, nonfinite)
                _keep_worst(best, best_loss, best_fooled, x_adv, loss, fooled)
        return best, nonfinite

    def _search_early_exit(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> tuple[Tensor, Tensor]:
        """`_search` that takes each example out of the search at its first visited point that the model
        misclassifies (kept as its adversarial example). The batch shrinks to `shrink`'s ladder sizes, its
        decided rows still searched but ignored; the unfooled examples get the final iterate (one search; where
        `_search` returns their highest-loss point instead, the accuracy is the same) or the highest-loss final
        iterate of the restarts."""
        linf = self.norm is Norm.LINF
        out = x.clone()  # (N, C, H, W)
        best_loss = torch.full(y.shape, -math.inf, device=x.device)  # unfooled examples, over restarts
        nonfinite = torch.zeros(y.shape, dtype=torch.bool, device=x.device)
        todo = torch.ones(y.shape, dtype=torch.bool, device=x.device)  # (N,) no visited point fooled it yet
        for _ in range(self.restarts):
            keep = shrink(todo)
            idx = torch.arange(y.shape[0], device=x.device) if keep is None else keep.nonzero().flatten()
            if idx.numel() == 0:
                break
            live, xs, ys = todo[idx], x[idx], y[idx]  # live: the searched rows whose results count
            lo = (xs - self.eps).clamp_(min=0.0) if linf else None
            hi = (xs + self.eps).clamp_(max=1.0) if linf else None
            x_adv = torch.empty_like(xs)
            with torch.no_grad():
                self._start(x_adv, xs, lo, hi, generator)
            for step in range(self.steps + (self.restarts > 1)):  # several restarts: their final iterates judged
                x_adv.requires_grad_(True)
                flags = torch.zeros(ys.shape, dtype=torch.bool, device=x.device)
                loss, fooled = self._forward(model, x_adv, ys, flags)
                nonfinite[idx] |= flags & live
                last = step == self.steps
                grad = None if last else torch.autograd.grad(loss.sum(), x_adv)[0]
                x_adv, loss = x_adv.detach(), loss.detach()
                new = fooled & live
                put_rows(out, idx, new, x_adv)
                todo[idx] &= ~new
                live = live & ~fooled
                if last:
                    take = live & (loss > best_loss[idx])
                    put_rows(out, idx, take, x_adv)
                    best_loss[idx] = torch.where(take, loss, best_loss[idx])
                    break
                keep = shrink(live)  # the step's one host sync
                if keep is not None:
                    idx, xs, ys, x_adv, grad, live = idx[keep], xs[keep], ys[keep], x_adv[keep], grad[keep], live[keep]
                    lo, hi = (None, None) if not linf else (lo[keep], hi[keep])
                    if idx.numel() == 0:
                        break
                with torch.no_grad():
                    self._step(x_adv, grad, xs, lo, hi)
            else:  # one search: the unfooled take the final iterate, which `_search` would judge last
                put_rows(out, idx, live, x_adv)
        return out, nonfinite

    def _forward(self, model: nn.Module, x_adv: Tensor, y: Tensor, nonfinite: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example float32 loss (N,) and whether the model misclassifies (N,).

        Rows of non-finite logits are or-ed into `nonfinite` (N,) in place, on the device (no sync).
        """
        if self.autocast_dtype is None:
            logits = model(x_adv)
        else:
            with torch.autocast(device_type=x_adv.device.type, dtype=self.autocast_dtype):
                logits = model(x_adv)
        if logits.ndim != 2 or logits.shape[0] != y.shape[0]:
            raise ValueError(f"the model must return (N, K) logits, got shape {tuple(logits.shape)}")
        nonfinite |= nonfinite_rows(logits)  # at the model's precision: an fp16 overflow counts
        logits = logits.float()  # (N, K)
        return attack_loss(self.loss, logits, y), logits.detach().argmax(dim=1) != y

    def _start(self, x_adv: Tensor, x: Tensor, lo: Tensor | None, hi: Tensor | None, generator) -> None:
        """Write the starting point of one restart into `x_adv` (in place, no grad)."""
        if not self.random_start:
            x_adv.copy_(x)
        elif self.norm is Norm.LINF:
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            torch.add(x, noise.mul_(2 * self.eps).sub_(self.eps), out=x_adv)  # x + U(-eps, eps)
            x_adv.clamp_(min=lo, max=hi)
        else:
            dims = tuple(range(1, x.ndim))
            direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            direction /= torch.linalg.vector_norm(direction, dim=dims, keepdim=True).clamp_min_(1e-12)
            u = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), generator=generator,
                           device=x.device, dtype=x.dtype)  # (N, 1, 1, 1)
            radius = u.pow_(1.0 / math.prod(x.shape[1:])).mul_(self.eps)
            torch.addcmul(x, direction, radius, out=x_adv)
            x_adv.clamp_(0.0, 1.0)

    def _step(self, x_adv: Tensor, grad: Tensor, x: Tensor, lo: Tensor | None, hi: Tensor | None) -> None:
        """One ascent step and projection, in place on `x_adv` (no grad); `grad` is consumed."""
        if self.norm is Norm.LINF:
            x_adv.add_(grad.sign_(), alpha=self.step_size)
            x_adv.clamp_(min=lo, max=hi)
            return
        dims = tuple(range(1, x.ndim))
        # Rescale by the largest entry first so tiny gradients do not underflow in the norm.
        peak = grad.abs().amax(dim=dims, keepdim=True)  # (N, 1, 1, 1)
        grad.div_(torch.where(peak > 0, peak, 1.0))
        norm = torch.linalg.vector_norm(grad, dim=dims, keepdim=True).clamp_min_(1.0)  # >= 1 unless 0
        x_adv.addcdiv_(grad, norm, value=self.step_size)
        delta = x_adv - x  # (N, C, H, W)
        length = torch.linalg.vector_norm(delta, dim=dims, keepdim=True)  # (N, 1, 1, 1)
        scale = torch.where(length > self.eps, self.eps / length, 1.0)  # no 0/0 when eps underflows
        torch.addcmul(x, delta, scale, out=x_adv)
        x_adv.clamp_(0.0, 1.0)


class FGSM(PGD):
    """Fast gradient (sign) method: one step of size `eps`, no random start.

    Same call contract and worst-case selection as `PGD`: of x and its step, a misclassified one if
    either is (the higher-loss one if both are), else the higher-loss one.
    """

    def __init__(
        self,
        norm: Norm | str = "linf",
        *,
        eps: float,
        loss: AttackLoss = "ce",
        autocast_dtype: torch.dtype | str | None = None,
    ):
        super().__init__(norm, eps=eps, step_size=eps, steps=1, loss=loss, random_start=False,
                         restarts=1, seed=None, autocast_dtype=autocast_dtype)

    @classmethod
    def from_threat(cls, threat: Threat, **kwargs) -> "FGSM":  # type: ignore[override]
        """FGSM with the norm and eps of `threat` (its step size is not used)."""
        return cls(threat.norm, eps=threat.eps, **kwargs)


#: Early exit shrinks a searched batch only to the sizes of a fixed ladder, each about 8/9 of the next
#: (1, 2, ..., 8, 9, 11, 13, ..., 449, 506, ...), keeping some decided examples (their results ignored) to fill a
#: size. Compacting to every new count would allocate tensors of a new size at almost every step, which fragments
#: the host allocator's heap: an evaluation's peak memory then grew with every batch (README "Precautions"). A
#: bounded set of sizes is reused batch after batch, for at most 1/8 more rows searched than needed.
LADDER_GROWTH = 9 / 8


_LADDER = [1]  # extended as larger counts come


def ladder_size(count: int) -> int:
    """The smallest size of the early-exit ladder that holds `count` rows (0 for none)."""
    if count <= 0:
        return 0
    while _LADDER[-1] < count:
        _LADDER.append(max(_LADDER[-1] + 1, math.ceil(_LADDER[-1] * LADDER_GROWTH)))
    return _LADDER[bisect.bisect_left(_LADDER, count)]


def shrink(live: Tensor) -> Tensor | None:
    """Which rows of a searched batch to keep, as a bool mask (n,), or None to keep them all: every live row and
    the first decided ones, up to the `ladder_size` of the live count when that is below n (no rows when none is
    live). One host sync (the live count)."""
    count = int(live.sum())
    size = ladder_size(count)
    if size >= live.numel():
        return None
    keep = live.clone()
    keep[(~live).nonzero().flatten()[: size - count]] = True
    return keep


def put_rows(out: Tensor, idx: Tensor, take: Tensor, values: Tensor) -> None:
    """``out[idx[take]] = values[take]`` without a host sync: rows `idx` (n,) of `out` take `values` (n, ...) where
    `take` (n,) is set and keep their own elsewhere."""
    out[idx] = torch.where(take.view((-1,) + (1,) * (values.ndim - 1)), values.to(out.dtype), out[idx])


def _keep_worst(best: Tensor, best_loss: Tensor, best_fooled: Tensor,
                x_adv: Tensor, loss: Tensor, fooled: Tensor) -> None:
    """Update the running worst case in place: the largest (misclassified, loss) pair wins."""
    loss = loss.detach()
    take = fooled & ~best_fooled | (fooled == best_fooled) & (loss > best_loss)  # (N,)
    torch.where(take, loss, best_loss, out=best_loss)
    best_fooled |= fooled
    torch.where(take.view((-1,) + (1,) * (best.ndim - 1)), x_adv.detach(), best, out=best)


def _check_inputs(x: Tensor, y: Tensor) -> None:
    """Fail early on misuse; one host sync per call (the [0,1] range check), none per step."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "attacks need autograd, which torch.inference_mode() disables for good; "
            "call the attack outside inference mode (torch.no_grad() is fine)"
        )
    if not x.is_floating_point() or x.ndim < 2:
        raise ValueError(f"x must be a floating batch (N, ...), got {x.dtype} of shape {tuple(x.shape)}")
    if y.shape != x.shape[:1] or y.is_floating_point():
        raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError(
            "attacks expect images in [0,1] (normalization lives inside the model), got values "
            f"in [{x.min().item():.4g}, {x.max().item():.4g}]"
        )
