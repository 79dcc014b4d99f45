"""Auto-PGD (Croce and Hein, ICML 2020) with early exit, and the adaptive attack on a mixture built from it.

`APGD` follows the attack contract of `mixrobust.attacks.pgd` (``attack(model, x, y) -> x_adv``).
Its step size needs no tuning: it starts at 2 eps and is halved at checkpoints of the iteration
budget when the loss stalls (`stalled`: at most 75% of the steps since the last checkpoint raised
it, or the step was not halved at the last checkpoint and the best loss has not risen since), each
halving restarting from the best point; steps carry momentum 0.75. `steps` counts gradient steps, as
AutoAttack's ``n_iter`` does: a search evaluates the start and `steps` iterates. Losses: ``ce``
(cross-entropy), ``dlr`` (the difference of logits ratio, invariant to the logits' scale and shift)
and ``dlr_targeted`` (towards one class; with ``targets=T`` the search runs once for each of the T
classes ranked highest on the clean image, the label left out).

Where it departs from the authors' code (fra31/auto-attack): the checkpoints are the paper's ceil(p_j steps),
which equal the code's integer schedule at 100 steps (the default) and 200, not at every budget (20 steps: the
paper's 5, 9, 12, 14, 16, 18, 19; the code's 4, 7, 9, then every step); the step after a halving carries no
momentum and counts its rise against the best loss (the code keeps x_best - x_(k-1) as momentum and compares
with the abandoned iterate); without ``random_start`` (the default) a search starts at x, where the code
always draws a random start.

Surrogate gradients (``surrogate=True``): when the model has a method ``outputs_and_surrogate(x) ->
(outputs, surrogate)`` (`mixrobust.mixing.MixedClassifier` does: the logit-space mixture), the loss
and its gradient come from the surrogate and success is judged on the outputs; only a point the true
outputs misclassify counts. On the digits mixtures it is weaker than the default, which attacks the
outputs themselves with the scale-invariant DLR loss (the cross-entropy of the log of averaged
softmaxes saturates where one base model is confident; DLR's ratio of logit differences does not).

Early exit (``early_exit=True``, the default): an example is dropped from the search at the first
visited point that the model misclassifies, which is kept as its adversarial example; the batch
shrinks as examples are dropped, to the sizes of a fixed ladder (`mixrobust.attacks.pgd.shrink`).
The reported accuracy is identical to the full search's (``early_exit=False``): an example counts as
robust only if no visited point fooled it, and the examples still searched do not depend on which
others are in the batch (without random start; with it, the starts drawn for later searches differ,
so the accuracies are then statistically, not exactly, equal). The first fooling point lies at the
attacked model's decision boundary: use it for that model's accuracy, not as a transfer attack. The
full search is the one for transfer images (the sweep's adaptive images on g and on h, judged by every
mixture): it searches every example to the end, those misclassified on the clean image too, and
returns, as `PGD` does, the highest-loss visited point among those that fool the model. Without
random start the searches are deterministic; with it, the starts are drawn for the whole batch at
once from a generator seeded with `seed`, so results are reproducible for a seed and batch.

`AdaptiveMixAttack` runs APGD-CE, then APGD-DLR, then targeted APGD-DLR on the examples still robust
(each stage only on them, as AutoAttack chains its attacks).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from mixrobust.attacks.losses import cross_entropy_loss
from mixrobust.attacks.pgd import (_check_inputs, _number, eval_mode, nonfinite_rows, put_rows, raise_if_nonfinite,
                                   shrink)
from mixrobust.errors import ConfigError, check_choice
from mixrobust.threat import Norm

APGDLoss = Literal["ce", "dlr", "dlr_targeted"]
APGD_LOSSES: tuple[str, ...] = get_args(APGDLoss)
MOMENTUM = 0.75  # weight of the new step; 1 - MOMENTUM on the previous one (Croce and Hein, eq. (2))


def checkpoints(steps: int) -> list[int]:
    """The iterations where APGD may halve its step: ceil(p_j * steps) for p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), below `steps` (the paper's schedule; see the module doc)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = {math.ceil(round(v * steps, 9)) for v in p}  # rounded: 0.41 + 0.16 is 0.5700000000000001 in floats
    return sorted(m for m in marks if m < steps)


def stalled(ups: Tensor, interval: int, reduced: Tensor, best_then: Tensor, best_now: Tensor,
            rho: float = 0.75) -> Tensor:
    """Where APGD halves its step at a checkpoint (Croce and Hein, section 3.2, as their code tests it), per example:
    condition 1, at most `rho` of the `interval` steps since the last checkpoint raised the loss (`ups`
    counts them); condition 2, the step was not halved at the last checkpoint (`reduced` False; it starts True,
    so the first checkpoint tests condition 1 alone) and the best loss `best_now` is no higher than it was
    there (`best_then`)."""
    return (ups <= rho * interval) | (~reduced & (best_then >= best_now))


def target_classes(scores: Tensor, y: Tensor, targets: int) -> Tensor:
    """The `targets` classes of highest clean `scores` (N, K) other than the label `y` (N,), best first: (N, T).
    The label is left out whatever its score (a surrogate's top class need not be the label)."""
    return scores.detach().scatter(1, y[:, None], float("-inf")).topk(targets, dim=1).indices


def dlr_loss(z: Tensor, y: Tensor) -> Tensor:
    """-(z_y - max_{i != y} z_i) / (z_(1) - z_(3) + 1e-12) per example (z_(k): k-th largest), (N, K) -> (N,)."""
    z = z.float()
    top = z.topk(3, dim=1).values  # (N, 3)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(z: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12) per example, towards class `target` (N,)."""
    z = z.float()
    top = z.topk(4, dim=1).values  # (N, 4)
    z_y, z_t = z.gather(1, y[:, None]).squeeze(1), z.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _outputs(model: nn.Module, x: Tensor, surrogate: bool = True) -> tuple[Tensor, Tensor]:
    """(outputs judged, logits differentiated): the model's surrogate when it offers one and `surrogate` is on."""
    both = getattr(model, "outputs_and_surrogate", None) if surrogate else None
    if both is not None:
        out, surrogate = both(x)
        return out, surrogate
    out = model(x)
    return out, out


class APGD:
    """Auto-PGD in the `norm` ball of radius `eps` (see the module doc); `steps` gradient steps per search.

    Returns, per example, the first visited point that the model misclassifies (``early_exit=False``: the
    fooling point of highest loss, examples misclassified on x searched too), else the point of highest
    loss. `targets` applies to ``dlr_targeted`` (one search per target class); `restarts`
    repeat every search from another random start (``random_start`` required for more than one).
    Raises `NonFiniteError` when the model's outputs were NaN or inf at a visited point.
    """

    def __init__(self, norm: Norm | str = "linf", *, eps: float, steps: int = 100, loss: APGDLoss = "ce",
                 targets: int = 3, restarts: int = 1, random_start: bool = False, seed: int | None = 0,
                 rho: float = 0.75, early_exit: bool = True, surrogate: bool = False):
        self.norm = Norm.parse(norm)
        self.eps = _number("eps", eps, low=0.0)
        self.steps = _number("steps", steps, low=1, integer=True)
        self.loss = check_choice("adaptive.losses", loss, APGD_LOSSES)
        self.targets = _number("targets", targets, low=1, integer=True)
        self.restarts = _number("restarts", restarts, low=1, integer=True)
        if not isinstance(random_start, bool):
            raise ConfigError(f"random_start must be true or false, got {random_start!r}")
        if self.restarts > 1 and not random_start:
            raise ConfigError(f"restarts={self.restarts} needs random_start=true: without a random start every "
                              "restart repeats the same deterministic search")
        self.random_start = random_start
        self.seed = None if seed is None else _number("seed", seed, low=0, integer=True)
        self.rho = float(rho)
        if not isinstance(early_exit, bool):
            raise ConfigError(f"early_exit must be true or false, got {early_exit!r}")
        self.early_exit = early_exit
        self.surrogate = bool(surrogate)

    def __repr__(self) -> str:
        target = f", targets={self.targets}" if self.loss == "dlr_targeted" else ""
        return (f"APGD(norm={self.norm.value!r}, eps={self.eps:g}, steps={self.steps}, loss={self.loss!r}{target}, "
                f"restarts={self.restarts}, random_start={self.random_start}, seed={self.seed}"
                f"{'' if self.early_exit else ', early_exit=False'})")

    @property
    def searches(self) -> int:
        """Searches per example (restarts times targets): the attack's cost in units of `steps` gradient steps."""
        return self.restarts * (self.targets if self.loss == "dlr_targeted" else 1)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        _check_inputs(x, y)
        x, y = x.detach(), y.detach().long()
        out = x.clone()
        self.attack_into(model, x, y, out)
        return out

    def attack_into(self, model: nn.Module, x: Tensor, y: Tensor, out: Tensor, todo: Tensor | None = None) -> None:
        """Attack the rows of `x` (N, ...) where `todo` (N,) is True (all if None), writing each one's point into
        `out` (N, ...); the other rows of `out` are left alone. With early exit every model pass is on all N rows
        or on a ladder size (`shrink`), never on the count of `todo`, so a chain of attacks on a shrinking set of
        examples meets few distinct batch shapes (each new one costs the backend new kernels, cached in memory)."""
        if self.eps == 0 or x.shape[0] == 0:
            return
        generator = None if self.seed is None else torch.Generator(device=x.device).manual_seed(self.seed)
        nonfinite = torch.zeros(y.shape, dtype=torch.bool, device=x.device)
        with eval_mode(model), torch.enable_grad():
            with torch.no_grad():
                clean, surrogate = _outputs(model, x, self.surrogate)
            broken = nonfinite_rows(clean)  # misclassified: x itself fools them, and early exit leaves them there
            wanted = clean.argmax(1) == y if self.early_exit else torch.ones_like(broken)
            if todo is not None:
                wanted, broken = wanted & todo, broken & todo
            nonfinite |= broken
            active = wanted.nonzero().flatten()
            if self.loss == "dlr_targeted" and surrogate.shape[1] < 4:
                raise ConfigError("the targeted DLR loss needs at least 4 classes")
            if self.loss == "dlr_targeted" and self.targets > surrogate.shape[1] - 1:
                raise ConfigError(f"targets={self.targets}, but the model has {surrogate.shape[1]} classes: at most "
                                  f"{surrogate.shape[1] - 1} other classes to target")
            ranked = target_classes(surrogate, y, self.targets) if self.loss == "dlr_targeted" else None  # (N, T)
            best = torch.full(y.shape, -math.inf, device=x.device)  # the highest loss of the unfooled examples
            for _ in range(self.restarts):
                for t in range(1 if ranked is None else self.targets):
                    if active.numel() == 0:
                        break
                    target = None if ranked is None else ranked[:, t]
                    active = self._search(model, x, y, active, target, out, best, nonfinite, generator)
        raise_if_nonfinite(nonfinite, "the model", during=" during the APGD search")

    # --- one search ------------------------------------------------------------------------------

    def _loss(self, z: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if self.loss == "ce":
            return cross_entropy_loss(z, y)
        return dlr_loss(z, y) if target is None else dlr_targeted_loss(z, y, target)

    def _eval(self, model, x_adv: Tensor, y: Tensor, target, nonfinite: Tensor, idx: Tensor, live: Tensor):
        """Loss (n,), gradient (n, ...), fooled (n,) at `x_adv` (n, ...): one forward and one backward pass.
        Non-finite outputs of the `live` rows (n,) are flagged in `nonfinite` at `idx` (n,)."""
        x_adv = x_adv.detach().requires_grad_(True)
        out, surrogate = _outputs(model, x_adv, self.surrogate)
        nonfinite[idx] |= nonfinite_rows(out) & live
        loss = self._loss(surrogate, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        return loss.detach(), grad, out.detach().argmax(1) != y

    def _project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        if self.norm is Norm.LINF:
            return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp_(0.0, 1.0)
        delta = x_adv - x
        dims = tuple(range(1, x.ndim))
        length = torch.linalg.vector_norm(delta, dim=dims, keepdim=True)
        return (x + delta * torch.where(length > self.eps, self.eps / length.clamp_min(1e-12), 1.0)).clamp_(0.0, 1.0)

    def _direction(self, grad: Tensor) -> Tensor:
        if self.norm is Norm.LINF:
            return grad.sign()
        dims = tuple(range(1, grad.ndim))
        return grad / torch.linalg.vector_norm(grad, dim=dims, keepdim=True).clamp_min(1e-12)

    def _start(self, x: Tensor, generator) -> Tensor:
        if not self.random_start:
            return x.clone()
        if self.norm is Norm.LINF:
            t = torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1
            return self._project(x + self.eps * t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1), x)
        t = torch.randn(x.shape, generator=generator, device=x.device)
        dims = tuple(range(1, x.ndim))
        return self._project(x + self.eps * t / torch.linalg.vector_norm(t, dim=dims, keepdim=True).clamp_min(1e-12), x)

    def _search(self, model, x_all: Tensor, y_all: Tensor, active: Tensor, target, out: Tensor, best: Tensor,
                nonfinite: Tensor, generator) -> Tensor:
        """APGD on the examples `active` (indices into the batch; `target` (N,): each one's target class, or None);
        each one's first fooling point (without early exit: its highest-loss fooling point) is written to `out`.
        Returns the indices still unfooled. `best` (N,) keeps each unfooled example's highest loss over searches,
        whose point is in `out`. With early exit the searched rows shrink to `shrink`'s ladder sizes as examples
        are fooled (decided rows kept to fill a size are searched but ignored: ``live`` is False for them)."""
        view = (-1,) + (1,) * (x_all.ndim - 1)
        checks = {c for c in checkpoints(self.steps) if c > 0}
        live = torch.zeros(y_all.shape, dtype=torch.bool, device=x_all.device)
        live[active] = True
        keep = shrink(live) if self.early_exit else live
        rows = torch.arange(y_all.shape[0], device=x_all.device) if keep is None else keep.nonzero().flatten()
        s = {"idx": rows, "x": x_all[rows], "y": y_all[rows], "live": live[rows]}  # per-example state, shrunk together
        if target is not None:
            s["t"] = target[rows]
        s["cur"] = self._start(s["x"], generator)
        s["loss"], s["grad"], fooled = self._eval(model, s["cur"], s["y"], s.get("t"), nonfinite, s["idx"], s["live"])
        s["prev"], s["best"], s["loss_best"], s["grad_best"] = s["cur"], s["cur"], s["loss"], s["grad"]
        s["eta"] = torch.full(s["idx"].shape, 2 * self.eps, device=x_all.device)
        s["ups"] = torch.zeros_like(s["loss"])  # steps since the last checkpoint that raised the loss
        s["reduced"] = torch.ones_like(s["live"])  # halved at the last checkpoint (the start counts as one)
        s["best_then"] = s["loss_best"].clone()
        deepest = not self.early_exit  # keep searching fooled examples, for their highest-loss fooling point
        if deepest:
            s["mine"], s["fool_loss"] = s["live"].clone(), torch.full_like(s["loss"], -math.inf)
        last = 0
        for k in range(self.steps + 1):  # s["cur"] is x_k: its loss, gradient and outcome are known
            if deepest:
                take = s["mine"] & fooled & (s["loss"] > s["fool_loss"])
                s["fool_loss"] = torch.where(take, s["loss"], s["fool_loss"])
            else:
                take = fooled & s["live"]  # the first fooling point
            put_rows(out, s["idx"], take, s["cur"].detach())
            s["live"] = s["live"] & ~fooled
            keep = shrink(s["live"]) if self.early_exit else None  # the step's one host sync
            if keep is not None:
                s = {key: value[keep] for key, value in s.items()}
                if s["idx"].numel() == 0:
                    return s["idx"]
            if k == self.steps:
                break
            with torch.no_grad():
                if k in checks:  # halve the step where the loss stalled, restarting from the best point
                    halve = stalled(s["ups"], k - last, s["reduced"], s["best_then"], s["loss_best"], self.rho)
                    s["eta"] = torch.where(halve, s["eta"] / 2, s["eta"])
                    for key, best_key in (("cur", "best"), ("prev", "best"), ("grad", "grad_best"),
                                          ("loss", "loss_best")):
                        mask = halve.view(view) if s[key].ndim > 1 else halve
                        s[key] = torch.where(mask, s[best_key], s[key])
                    s["ups"] = torch.zeros_like(s["ups"])
                    s["reduced"], s["best_then"], last = halve, s["loss_best"].clone(), k
                z = self._project(s["cur"] + s["eta"].view(view) * self._direction(s["grad"]), s["x"])
                weight = 1.0 if k == 0 else MOMENTUM
                nxt = self._project(s["cur"] + weight * (z - s["cur"]) + (1 - weight) * (s["cur"] - s["prev"]), s["x"])
            loss, grad, fooled = self._eval(model, nxt, s["y"], s.get("t"), nonfinite, s["idx"], s["live"])
            with torch.no_grad():
                s["ups"] = s["ups"] + (loss > s["loss"]).float()
                better = loss > s["loss_best"]
                s["best"] = torch.where(better.view(view), nxt, s["best"])
                s["grad_best"] = torch.where(better.view(view), grad, s["grad_best"])
                s["loss_best"] = torch.where(better, loss, s["loss_best"])
            s["prev"], s["cur"], s["loss"], s["grad"] = s["cur"], nxt, loss, grad
        # unfooled: keep the highest-loss point over this and earlier searches
        s = {key: value[s["live"]] for key, value in s.items()}
        take = s["loss_best"] > best[s["idx"]]
        out[s["idx"][take]] = s["best"][take].detach()
        best[s["idx"][take]] = s["loss_best"][take]
        return s["idx"]


class AdaptiveMixAttack:
    """APGD stages chained on the examples each leaves robust: by default APGD-CE, then APGD-DLR, then targeted
    APGD-DLR on the `targets` highest-ranked classes other than the label, on the mixture's own outputs
    (``surrogate=True``: on its logit-space surrogate; weaker on the digits mixtures, see README "Attack strength").

    The attack contract of `mixrobust.attacks.pgd`; its accuracy is the per-example worst case over the
    stages (each stage attacks only what the previous ones left robust, keeping their points). `early_exit`
    applies to every stage (see `APGD`; off, each point is the full search's deepest fooling point).
    """

    def __init__(self, norm: Norm | str = "linf", *, eps: float, steps: int = 100,
                 losses: Sequence[APGDLoss] = ("ce", "dlr", "dlr_targeted"), targets: int = 5, restarts: int = 1,
                 random_start: bool = False, seed: int | None = 0, surrogate: bool = False, early_exit: bool = True):
        losses = [losses] if isinstance(losses, str) else list(losses)
        if not losses:
            raise ConfigError("adaptive.losses must name at least one of " + ", ".join(APGD_LOSSES))
        self.stages = [APGD(norm, eps=eps, steps=steps, loss=loss, targets=targets, restarts=restarts,
                            random_start=random_start, seed=seed, surrogate=surrogate, early_exit=early_exit)
                       for loss in losses]
        self.surrogate = bool(surrogate)
        first = self.stages[0]
        self.norm, self.eps, self.steps, self.random_start = first.norm, first.eps, first.steps, first.random_start

    def __repr__(self) -> str:
        first = self.stages[0]
        return (f"AdaptiveMixAttack(norm={self.norm.value!r}, eps={self.eps:g}, steps={self.steps}, "
                f"losses={[s.loss for s in self.stages]}, targets={self.stages[-1].targets}, "
                f"restarts={first.restarts}, random_start={first.random_start}, seed={first.seed}, "
                f"surrogate={self.surrogate})")

    @property
    def early_exit(self) -> bool:
        return self.stages[0].early_exit

    def with_early_exit(self, early_exit: bool = True) -> "AdaptiveMixAttack":
        """A copy whose stages have `early_exit` set (the sweep: off for the transfer images on g and on h)."""
        out = copy.copy(self)
        out.stages = [copy.copy(stage) for stage in self.stages]
        for stage in out.stages:
            stage.early_exit = early_exit
        return out

    @property
    def label(self) -> str:
        """How tables name it: ``APGD-CE+T3 (50)``."""
        parts = [{"ce": "CE", "dlr": "DLR", "dlr_targeted": f"T{s.targets}"}[s.loss] for s in self.stages]
        return f"APGD-{'+'.join(parts)} ({self.steps}{', surrogate' if self.surrogate else ''})"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        _check_inputs(x, y)
        x, y = x.detach(), y.detach().long()
        out = x.clone()
        todo = torch.ones(y.shape, dtype=torch.bool, device=x.device)
        for i, stage in enumerate(self.stages):
            if i:  # what the stages so far left robust (no such pass after the last stage)
                with torch.no_grad(), eval_mode(model):
                    todo &= model(out).argmax(1) == y
                if not todo.any():
                    break
            stage.attack_into(model, x, y, out, todo)  # on all rows: no batch of a new size
        return out
