"""The alpha-sweep engine: clean, transfer (STD, ROB) and adaptive (MIX) accuracy of h^alpha.

What is computed once and reused (the engine's contract; `reference_sweep` computes every
(alpha, attack) pair from scratch and serves as its test oracle and benchmark baseline):

- g's and h's outputs on the clean images, once; for ``r_option=one`` every mixture's outputs on
  a fixed image set, for the whole alpha vector, follow from those logits without a model pass;
  other R_i options evaluate one vector-alpha `MixedClassifier` pass per image set;
- the STD (PGD on g) and ROB (PGD on h) adversarial images, once per sweep, judged by every
  mixture at every alpha;
- MIX (PGD on the mixture) per alpha, except at alpha = 0 and alpha = 1 where the mixture is
  log_softmax(g) (logit space: g) and log_softmax(h) (h): PGD on it maximises the same loss as
  PGD on g (h) with the same settings and seed, so MIX there *is* STD's (ROB's) images and
  outcomes. (Equal in exact arithmetic; float rounding of the extra log_softmax could flip the
  sign of a vanishing gradient component. ``reuse=False`` attacks the mixture instead.)

Every reported number counts an example only if it is classified correctly on the clean image
(see `mixrobust.evaluation.outcomes`; margins likewise split the attacked images of clean-correct
examples only). So `skip_misclassified` can leave out of an attack the examples whose every
reported outcome is already decided: for MIX (and AutoAttack) those the mixture gets wrong clean;
for STD and ROB, whose images every model judges, those that g, h and every mixture get wrong
clean. Their attacked outcome is recorded as the clean one; without random start that is also
what PGD would report for them (x itself is a visited point that fools the model), and the
other examples' searches do not depend on the batch, so no reported number changes. With
``random_start`` skipping would change the random draws, so it is then ignored (with a warning).
AutoAttack always runs on the examples the mixture gets right clean, as both implementations
would do themselves.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from mixrobust.attacks import PGD, AdaptiveMixAttack, Attack, attack_chunks, eval_mode, model_device
from mixrobust.attacks.pgd import nonfinite_rows, raise_if_nonfinite
from mixrobust.errors import ConfigError, NonFiniteError
from mixrobust.evaluation.margins import margin_summary, probability_gap
from mixrobust.evaluation.options import CLEAN, AttackName, MixOption, parse_attacks
from mixrobust.evaluation.outcomes import Outcomes, aggregate, concat_outcomes
from mixrobust.evaluation.preflight import run_preflight
from mixrobust.mixing import HMap, MixedClassifier, MixSpace, ROption, check_compatible, mix_log_probs, mix_logits
from mixrobust.mixing.options import check_alphas
from mixrobust.runtime import progress
from mixrobust.runtime.cache import DiskCache, code_digest, tensor_digest
from mixrobust.runtime.files import package_version

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass
class SweepResult:
    """Per-example outcomes, Table-1 margins, pre-flight warnings and phase timings (seconds).

    `gaps` holds the per-example probability gaps the margins are computed from (last axis:
    examples): ``g/clean``, ``g/std``, ``h/clean``, ``h/rob``, ``mix/clean`` (M, A, N) and, when MIX
    ran, ``mix/mix``; `merge_results` joins the results of example shards through them.
    """

    outcomes: Outcomes
    margins: dict
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    gaps: dict[str, np.ndarray] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """Result rows by the counting rule of `mixrobust.evaluation.outcomes`."""
        return aggregate(self.outcomes)


def merge_results(parts: Sequence[SweepResult]) -> SweepResult:
    """One result from the results of disjoint example shards, in shard order (exactly as one run would give).

    Outcomes and gaps are concatenated along the example axis and the margins recomputed from them;
    warnings are the first shard's (pre-flight runs on it) but the attack-strength ones, judged on all the
    examples; timings the slowest shard's per phase.
    """
    parts = list(parts)
    outcomes = concat_outcomes([p.outcomes for p in parts])
    gaps = {k: np.concatenate([p.gaps[k] for p in parts], axis=-1) for k in parts[0].gaps}
    timings = {k: max(p.timings.get(k, 0.0) for p in parts) for k in parts[0].timings}
    shard = set(strength_warnings(parts[0].outcomes))  # judged again on all the examples
    warnings = [w for w in parts[0].warnings if w not in shard] + strength_warnings(outcomes)
    return SweepResult(outcomes, margins_from(outcomes, gaps), warnings, timings, gaps)


def attack_label(attack) -> str:
    """How progress names an attack: ``PGD-20`` (steps, restarts when several), else its class name."""
    if isinstance(attack, PGD):
        return f"PGD-{attack.steps}" + (f" x{attack.restarts}" if attack.restarts > 1 else "")
    return type(attack).__name__


def attack_settings(attack) -> dict:
    """What an attack's images depend on, exactly (its repr rounds floats): class and every setting."""
    fields = {k: v for k, v in vars(attack).items() if not k.startswith("_")}
    return {"class": f"{type(attack).__module__}.{type(attack).__qualname__}",
            **{k: (float(v) if isinstance(v, float) else str(v)) for k, v in sorted(fields.items())}}


def module_digest(model: nn.Module) -> str:
    """sha256 of a model's class name, its ``spec`` (architecture, input shape, and for zoo models the resize its
    state does not show) and its state (parameter and buffer names and values): its cache identity."""
    state = model.state_dict()
    spec = json.dumps(getattr(model, "spec", None), sort_keys=True, default=str)
    names = f"{type(model).__module__}.{type(model).__qualname__}:{spec}:" + ",".join(state)
    return tensor_digest(torch.frombuffer(bytearray(names.encode()), dtype=torch.uint8), *state.values())


def mix_cached(g_logits: Tensor, h_logits: Tensor, alphas: Sequence[float], mix_space: MixSpace | str,
               h_map: HMap | None = None) -> Tensor:
    """Eq. (4) outputs (A, N, K) for every alpha from g's and h's logits (N, K) (``r_option=one``), h's logits
    first mapped by `h_map` (default: identity; the cache holds map-free logits, so one entry serves every map).

    Identical to ``MixedClassifier(g, h, alphas, "one", mix_space, h_map=h_map)(x)`` given those logits.
    """
    if h_map is not None:
        h_logits = h_map(h_logits)
    if MixSpace.parse(mix_space) is MixSpace.PROB:
        return mix_log_probs(torch.log_softmax(g_logits, -1), torch.log_softmax(h_logits, -1), alphas)
    return mix_logits(g_logits, h_logits, alphas)


def model_outputs(model: nn.Module, x: Tensor, batch_size: int, device: torch.device, name: str) -> Tensor:
    """float32 outputs of `model` on `x` (N >= 1) in chunks of `batch_size` on `device`, without gradients, back on
    x's device: (..., N, K).

    Raises `NonFiniteError` naming the model (`name`) and the examples concerned if any output is NaN or inf.
    """
    parts = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            parts.append(model(x[start:start + batch_size].to(device)).float().to(x.device))
    out = torch.cat(parts, dim=-2)
    bad = nonfinite_rows(out.movedim(-2, 0))  # (N,): any alpha's output row non-finite
    raise_if_nonfinite(bad, name)
    return out


@dataclass
class _Judged:
    """How the models fare on one image set: correctness and probability gap per example."""

    base: dict[str, tuple[np.ndarray, np.ndarray]]  # "g"/"h" -> ((N,) bool, (N,) float)
    correct: np.ndarray  # (M, A, N) bool, every mixture
    gap: np.ndarray  # (M, A, N) float

    @staticmethod
    def concat(parts: Sequence[_Judged]) -> _Judged:
        """The parts (consecutive example sets) as one, along the example axis."""
        base = {k: tuple(np.concatenate([p.base[k][i] for p in parts]) for i in (0, 1)) for k in parts[0].base}
        return _Judged(base, np.concatenate([p.correct for p in parts], -1), np.concatenate([p.gap for p in parts], -1))


class _Sweep:
    """One sweep's state: models, data and the mixtures (vector alpha to judge, scalar to attack)."""

    def __init__(self, g, h, x, y, alphas, options, attack, batch_size, detach_r, cache: DiskCache | None = None,
                 kernels: dict | None = None):
        self.g, self.h, self.x, self.y = g, h, x, y
        self.alphas, self.options, self.batch_size = alphas, options, batch_size
        self.device = model_device(g, x.device)
        self.cache = cache if cache is not None and cache.enabled else None
        if self.cache is not None:  # entries are keyed by one model each, so a sweep over h reuses g's, and these
            self.digests = {"g": module_digest(g), "h": module_digest(h)}
            self.key_parts = {"data": tensor_digest(x, y.long()), "device": self.device.type, "batch_size": batch_size,
                              "code": code_digest(), **({"kernels": kernels} if kernels else {})}
        kw = dict(norm=attack.norm, detach_r=detach_r, input_shape=tuple(x.shape[1:]))
        self.vector = [MixedClassifier(g, h, list(alphas), o.r_option, o.mix_space, h_map=o.h_map, **kw)
                       for o in options]
        self.single = [MixedClassifier(g, h, 0.5, o.r_option, o.mix_space, h_map=o.h_map, **kw) for o in options]

    def name(self, model: nn.Module) -> str:
        """How messages name a model of the sweep: g, h, or the mixture with its option and alpha."""
        if model is self.g or model is self.h:
            return "g" if model is self.g else "h"
        maps = "" if model.h_map.identity else f"/{model.h_map.label}"
        return f"the mixture ({model.r_option.value}/{model.mix_space.value}{maps}, alpha={model.alpha})"

    def outputs(self, model: nn.Module, x: Tensor) -> Tensor:
        """`model_outputs` of a model of the sweep, named as `name` does."""
        return model_outputs(model, x, self.batch_size, self.device, self.name(model))

    def base_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """g's and h's float32 outputs (n, K) on `x`."""
        return self.outputs(self.g, x), self.outputs(self.h, x)

    def clean_logits(self) -> tuple[Tensor, Tensor]:
        """g's and h's outputs on the clean images, from the cache when it holds them."""
        if self.cache is None:
            return self.base_logits(self.x)
        out = []
        for name, model in (("g", self.g), ("h", self.h)):
            key = self.cache.key("logits", model=self.digests[name], **self.key_parts)
            entry = self.cache.get_or_compute(key, lambda m=model: {"logits": self.outputs(m, self.x)})
            out.append(entry["logits"].to(self.x.device))
        return out[0], out[1]

    def adversarial(self, attack: Attack, target: str, keep: np.ndarray | None,
                    column: str | None = None) -> tuple[_Judged | None, np.ndarray]:
        """`attack` on base model `target` ("g" or "h") for the examples where `keep` is True (all if None),
        judged by every model: (their `_Judged` (None if there are none), their indices (n,)); `column` names the
        attack in progress (default STD on g, ROB on h).

        Without a cache each batch of images is judged as soon as it is attacked and dropped, so memory holds
        per-example results only. With a cache, the images and the target's outputs of every example attacked
        so far under the same key (the target model alone, data, attack, batch size, device) are read back,
        only the missing examples are attacked, and the entry is extended (it holds the images of the whole
        set, in memory too); the other model's outputs are computed (one pass). An example's images do not
        depend on which others are attacked with it (no random start; with one, every example is attacked at
        once).
        """
        model = self.g if target == "g" else self.h
        idx = self.indices(keep)
        column = column or ("STD" if target == "g" else "ROB")
        name = f"{column} attack ({getattr(attack, 'label', None) or attack_label(attack)} on {target})"
        if not len(idx):
            return None, idx
        if self.cache is None:
            with progress.stage(name, len(idx)) as shown:
                parts = self.run_attack(attack, model, idx, shown, self.judge)
            return _Judged.concat(parts), idx
        key = self.cache.key("adversarial", model=self.digests[target], attack=attack_settings(attack),
                             **self.key_parts)
        entry = self.cache.load(key)
        have = entry["index"].numpy() if entry is not None else np.zeros(0, np.int64)
        missing = np.setdiff1d(idx, have)
        if len(missing):
            with progress.stage(name, len(missing)) as shown:
                parts = self.run_attack(attack, model, missing, shown,
                                        lambda x_adv, y: (x_adv.cpu(), self.outputs(model, x_adv).cpu()))
            new = {"index": torch.from_numpy(missing), "x_adv": torch.cat([p[0] for p in parts]).to(self.x.dtype),
                   "logits": torch.cat([p[1] for p in parts])}
            if entry is not None:
                order = np.argsort(np.concatenate([have, missing]), kind="stable")
                new = {k: torch.cat([entry[k], new[k]])[torch.from_numpy(order)] for k in new}
            try:
                self.cache.save(key, new)
            except OSError as e:  # a full or read-only cache folder costs the sharing, not the run
                log.warning("could not write the cache entry %s (%s); continuing without it", self.cache.path(key), e)
            entry = new
        pos = torch.from_numpy(np.searchsorted(entry["index"].numpy(), idx))
        x_adv, own = entry["x_adv"][pos].to(self.x.device), entry["logits"][pos].to(self.x.device)
        other = self.outputs(self.h if target == "g" else self.g, x_adv)
        logits = (own, other) if target == "g" else (other, own)
        return self.judge(x_adv, self.y[torch.from_numpy(idx)], logits), idx

    def judge(self, x: Tensor, y: Tensor, logits: tuple[Tensor, Tensor] | None = None) -> _Judged:
        """Every model on image set `x` (n, C, H, W) with labels `y` (n,) (`logits`: g's and h's outputs, if known)."""
        gl, hl = logits if logits is not None else self.base_logits(x)  # (n, K)
        base = {name: ((out.argmax(1) == y).cpu().numpy(), probability_gap(out).cpu().numpy())
                for name, out in (("g", gl), ("h", hl))}
        outs = [mix_cached(gl, hl, self.alphas, o.mix_space, o.h_map) if o.cached else self.outputs(mixer, x)
                for o, mixer in zip(self.options, self.vector)]  # M x (A, n, K)
        out = torch.stack(outs)  # (M, A, n, K)
        return _Judged(base, (out.argmax(-1) == y).cpu().numpy(), probability_gap(out).cpu().numpy())

    def judge_single(self, m: int, alpha: float, x: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Mixture `m` at `alpha` on `x` (n, ...): ((n,) bool correct, (n,) gap)."""
        if self.options[m].cached:
            out = mix_cached(*self.base_logits(x), [alpha], self.options[m].mix_space, self.options[m].h_map)[0]
        else:
            self.single[m].alpha = alpha
            out = self.outputs(self.single[m], x)
        return (out.argmax(-1) == y).cpu().numpy(), probability_gap(out).cpu().numpy()

    def indices(self, keep: np.ndarray | None) -> np.ndarray:
        """The indices of the examples where `keep` (N,) is True (all if None)."""
        return np.arange(self.y.shape[0]) if keep is None else np.flatnonzero(keep)

    def run_attack(self, attack: Attack, model: nn.Module, idx: np.ndarray, shown: progress.Stage,
                   judge: Callable[[Tensor, Tensor], R]) -> list[R]:
        """Attack the examples `idx` (n,) `batch_size` at a time and ``judge(x_adv, y)`` each batch's images (on
        the model's device, with their labels there) as it comes (`attack_chunks`): the judgements in order,
        advancing progress stage `shown` as batches finish."""
        device = model_device(model, self.x.device)
        chunks = attack_chunks(attack, model, self.x, self.y, self.batch_size, torch.from_numpy(idx),
                               on_batch=shown.advance)
        return [judge(x_adv, self.y[torch.from_numpy(idx[start:start + x_adv.shape[0]])].to(device))
                for start, x_adv in _named(chunks, f"{type(attack).__name__} on {self.name(model)}")]

    @staticmethod
    def merge(clean: _Judged, part: _Judged | None, idx: np.ndarray) -> _Judged:
        """`clean` with the examples `idx` judged as in `part` (their judgement on other images)."""
        base = {k: (c.copy(), v.copy()) for k, (c, v) in clean.base.items()}
        out = _Judged(base, clean.correct.copy(), clean.gap.copy())
        if part is not None:
            for k, (c, v) in part.base.items():
                out.base[k][0][idx], out.base[k][1][idx] = c, v
            out.correct[..., idx], out.gap[..., idx] = part.correct, part.gap
        return out


def _named(chunks: Iterator[tuple[int, Tensor]], what: str) -> Iterator[tuple[int, Tensor]]:
    """`chunks` with a `NonFiniteError` raised while attacking prefixed by `what` (the attack and its target)."""
    try:
        yield from chunks
    except NonFiniteError as exc:
        raise NonFiniteError(f"{what}: {exc}") from None


def implementations(attack, autoattack=None, adaptive=None) -> dict[str, str]:
    """Which code runs each attack: ``mixrobust <version>`` for our PGD (std, rob, mix) and adaptive attack (apgd);
    AutoAttack's provenance (its implementation and version) for autoattack."""
    version = f"mixrobust {package_version()}"
    ours = version if isinstance(attack, PGD) else type(attack).__qualname__
    out = {"std": ours, "rob": ours, "mix": ours}
    if adaptive is not None:
        out["apgd"] = version if isinstance(adaptive, AdaptiveMixAttack) else type(adaptive).__qualname__
    if autoattack is not None:
        out["autoattack"] = getattr(autoattack, "provenance", type(autoattack).__qualname__)
    return out


def attack_labels(attack, autoattack=None, adaptive=None, detached: bool = False) -> dict[str, str]:
    """What each column of a results table is, for its legend: e.g. ``mix: PGD-20 (ce) on the mixture``.

    Settings that weaken an attack say so: a PGD search in half precision (``autocast_dtype``), and on every
    attack of the mixture an R_i held constant (`detached`; see `weakened_warnings`)."""
    half = _half_search(attack)
    search = "" if half is None else f", {half} search"
    pgd = f"{attack_label(attack)} ({attack.loss}{search})" if isinstance(attack, PGD) else type(attack).__name__
    unsound = "R_i detached: not a sound attack"
    paper = unsound if detached else "the paper's"
    out = {"std": f"{pgd} on g", "rob": f"{pgd} on h", "mix": f"{pgd} on the mixture ({paper})"}
    if adaptive is not None:
        out["apgd"] = (f"{getattr(adaptive, 'label', type(adaptive).__name__)} on the model itself "
                       f"(a mixture: and its points on g and on h{'; ' + unsound if detached else ''})")
    if autoattack is not None:
        out["autoattack"] = (f"AutoAttack standard ({getattr(autoattack, 'provenance', type(autoattack).__name__)})"
                             + (f" ({unsound})" if detached else ""))
    return out


def _half_search(attack) -> str | None:
    """The half-precision dtype a PGD search picks its points by (``autocast_dtype``: "bfloat16"), else None."""
    half = getattr(attack, "autocast_dtype", None) if isinstance(attack, PGD) else None
    return None if half is None else str(half).removeprefix("torch.")


def weakened_warnings(attack, detached: bool) -> list[str]:
    """What a sweep's settings take from its attacks' strength, one warning each (also in `attack_labels`): R_i
    held constant (`detached`: ``detach_r`` where an option's R_i depends on the image), a PGD search in half
    precision."""
    out = []
    if detached:
        out.append("mix.detach_r=true holds R_i constant in every attack on the mixture (an ablation): its MIX, APGD "
                   "and AutoAttack accuracies overstate its robustness; set mix.detach_r=false for numbers to report")
    half = _half_search(attack)
    if half is not None:
        out.append(f"attack.autocast_dtype={half}: the PGD searches (STD, ROB, MIX) pick "
                   "their points by half-precision outputs; report them only where float32 gives the same accuracy "
                   "within 0.5 points (benchmarks/bench_pgd.py --bf16)")
    return out


#: The paper's PGD on the mixture may overstate its robustness: warned about beyond this gap to the strongest attack.
STRENGTH_GAP = 0.01


def strength_warnings(outcomes: Outcomes) -> list[str]:
    """One warning per mixing option where the paper's PGD (mix) scores more than `STRENGTH_GAP` above the strongest
    other attack on the mixture (apgd, autoattack) at some alpha."""
    clean = outcomes.mix[CLEAN]
    others = [a for a in ("apgd", "autoattack") if a in outcomes.mix]
    if "mix" not in outcomes.mix or not others:
        return []
    out = []
    for m, option in enumerate(outcomes.options):
        gaps = []
        for a, alpha in enumerate(outcomes.alphas.tolist()):
            pgd = float((outcomes.mix["mix"][m, a] & clean[m, a]).mean())
            strongest = min(float((outcomes.mix[o][m, a] & clean[m, a]).mean()) for o in others)
            if pgd - strongest > STRENGTH_GAP:
                gaps.append(f"{alpha:g} ({pgd:.1%} vs {strongest:.1%})")
        if gaps:
            out.append(f"{option.label}: the paper's PGD on the mixture (mix) overstates its robustness by more than "
                       f"{STRENGTH_GAP:.0%} against the strongest attack ({' / '.join(others)}) at alpha "
                       f"{', '.join(gaps)}: report the worst case, not mix alone")
    return out


#: How many compiled variants of one forward `accelerate` lets torch.compile keep (raised from its default of 8).
COMPILED_VARIANTS = 64


def accelerate(g: nn.Module, h: nn.Module, channels_last: bool = False, compile: bool = False) -> dict:
    """Put g and h (in place) in channels_last memory format and / or compile their calls (``nn.Module.compile``,
    dynamic shapes: early exit shrinks the batch). Their outputs then differ from the eager ones by rounding
    only, so their cache entries are kept apart: returns the settings for the cache key ({} when both are off)."""
    if compile:  # g and h share their forward's code and each runs with and without gradients at many batch
        # sizes: past torch's default of 8 compiled variants per code object it would fall back to eager
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, COMPILED_VARIANTS)
    for model in (g, h):
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if compile:
            model.compile(dynamic=True)
    return {k: v for k, v in (("channels_last", channels_last), ("compile", compile)) if v}


def _preflight_models(sweep: _Sweep) -> dict[str, nn.Module]:
    """What pre-flight checks: g, h, and each mapped mixture at the sweep's largest alpha (a map that saturates
    can mask gradients where h alone does not)."""
    models = {"g": sweep.g, "h": sweep.h}
    top = max(sweep.alphas)
    for o in sweep.options:
        if not o.h_map.identity and top > 0:
            mixture = MixedClassifier(sweep.g, sweep.h, top, o.r_option, o.mix_space, norm=sweep.single[0].norm,
                                      h_map=o.h_map, input_shape=tuple(sweep.x.shape[1:])).eval()
            models[sweep.name(mixture)] = mixture
    return models


def _validate(g, h, x, y, alphas, options, attacks, autoattack, adaptive, batch_size) -> tuple:
    alphas, _ = check_alphas(list(alphas) if not isinstance(alphas, (int, float)) else [alphas])
    options = tuple(o if isinstance(o, MixOption) else MixOption(*o) for o in options)
    if not options:
        raise ConfigError("give at least one mixing option (r_option, mix_space)")
    attacks = parse_attacks(attacks)
    if AttackName.AUTOATTACK in attacks and autoattack is None:
        raise ConfigError("attacks include autoattack: pass autoattack=mixrobust.evaluation.AutoAttack(...)")
    if AttackName.APGD in attacks and adaptive is None:
        raise ConfigError("attacks include apgd: pass adaptive=mixrobust.attacks.AdaptiveMixAttack(...)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not x.is_floating_point() or x.ndim != 4 or y.shape != x.shape[:1] or x.shape[0] == 0:
        raise ConfigError(f"expected images (N, C, H, W) and labels (N,) with N >= 1, got {tuple(x.shape)} "
                          f"and {tuple(y.shape)}")
    if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
        raise ConfigError("images must lie in [0,1] (normalization lives inside the models)")
    num_classes, _ = check_compatible(g, h, x.shape[1:])
    for option in options:
        option.h_map.check_classes(num_classes)
    if num_classes is not None and y.numel() and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ConfigError(f"labels range over [{int(y.min())}, {int(y.max())}] but g and h have {num_classes} classes")
    return alphas, options, attacks


def run_sweep(
    g: nn.Module,
    h: nn.Module,
    x: Tensor,
    y: Tensor,
    index: Tensor | np.ndarray | None = None,
    *,
    alphas: Sequence[float],
    attack: PGD,
    options: Sequence[MixOption | tuple[str, str]] = (MixOption(),),
    attacks: Sequence[str] = ("std", "rob", "mix"),
    autoattack: Attack | None = None,
    adaptive: Attack | None = None,
    batch_size: int = 500,
    skip_misclassified: bool = True,
    reuse: bool = True,
    detach_r: bool = False,
    preflight: bool = True,
    cache: DiskCache | None = None,
    device: torch.device | None = None,
    channels_last: bool = False,
    compile: bool = False,
) -> SweepResult:
    """Sweep `alphas` for every mixing option of g and h on images `x` (N, C, H, W) in [0,1], labels `y` (N,).

    `attack` (its norm and eps are the threat) runs as STD (on g), ROB (on h) and MIX (on each
    mixture); `attacks` chooses which of std, rob, mix, apgd, autoattack count for the mixtures' rows
    and worst case (g's and h's own PGD always run: base rows, margins and the alpha 0/1 reuse).
    `adaptive` is the adaptive attack when ``apgd`` is among `attacks` (it then also runs on g and
    on h alone, for their rows and the mixture's at alpha 0 / 1; a mixture's apgd column also counts those
    points, judged by the mixture), `autoattack` the AutoAttack
    instance when ``autoattack`` is. Everything is
    validated before the first attack. g and h are frozen (eval mode, no parameter gradients);
    `x` and `y` stay on their device, chunks of `batch_size` go to the models' device.
    `options` are (r_option, mix_space[, h_map]) triples (`MixOption`); a map on h's logits (MixedNUTS,
    `mixrobust.mixing.maps`) is applied to the cached, map-free logits, its mixture at alpha 1 is attacked
    as a mixture (it is not h), and pre-flight checks the mapped mixture's gradients too.
    `index` (N,) records where the examples come from (default 0..N-1). `device` moves g and h there
    first (default: where they are); `channels_last` and `compile` put them in that memory format and
    compile them, in place (`accelerate`: the same accuracies; meant for a GPU, where they have not been
    timed yet; on a CPU compile is slower). Each example's outcomes depend on it alone (no random start),
    so the sweep of a shard of the examples gives that shard of the whole sweep. With a `cache`
    (`mixrobust.runtime.cache.DiskCache`), g's and h's outputs on the clean images and the STD
    and ROB images (with g's and h's outputs on them) are read from and written to it, keyed by
    the models' weights, the images and labels, the attack, the batch size and the device type,
    so the jobs of a sweep split over alpha compute them once.
    """
    if device is not None:
        g, h = g.to(device), h.to(device)
    alphas, options, attacks = _validate(g, h, x, y, alphas, options, attacks, autoattack, adaptive, batch_size)
    kernels = accelerate(g, h, channels_last, compile)
    random_apgd = AttackName.APGD in attacks and getattr(adaptive, "random_start", False)
    if skip_misclassified and (attack.random_start or random_apgd):
        log.warning("skip_misclassified is ignored with random_start (attack or adaptive): skipping would change "
                    "the random starts")
        skip_misclassified = False
    y = y.long()
    sweep = _Sweep(g, h, x, y, alphas, options, attack, batch_size, detach_r, cache, kernels)
    warnings = run_preflight(_preflight_models(sweep), x[:batch_size], y[:batch_size]) if preflight else []
    detached = detach_r and any(option.r_option is not ROption.ONE for option in options)  # R_i = 1 is constant
    for message in weakened_warnings(attack, detached):
        log.warning("%s", message)
        warnings.append(message)
    timings, t0 = {}, time.perf_counter()

    clean = sweep.judge(x, y, sweep.clean_logits())
    timings["clean"] = time.perf_counter() - t0
    judged = {}
    anyone = clean.base["g"][0] | clean.base["h"][0] | clean.correct.any(axis=(0, 1))  # (N,) right somewhere
    transfer = attack.with_early_exit(False) if isinstance(attack, PGD) else attack  # images judged by every model
    for name, target in (("std", "g"), ("rob", "h")):
        t0 = time.perf_counter()
        keep = anyone if skip_misclassified else None
        judged[name] = sweep.merge(clean, *sweep.adversarial(transfer, target, keep))
        timings[name] = time.perf_counter() - t0
    own = {}  # the adaptive attack on g and on h alone: their apgd column, and the mixture's at alpha 0 / 1
    if AttackName.APGD in attacks:
        t0 = time.perf_counter()
        # full searches: their points are judged by every mixture too, so each is the deepest fooling point found
        deep = adaptive.with_early_exit(False) if hasattr(adaptive, "with_early_exit") else adaptive
        for target in ("g", "h"):
            own[target] = sweep.merge(clean, *sweep.adversarial(deep, target, anyone if skip_misclassified
                                                                else None, "APGD"))
        timings["apgd/base"] = time.perf_counter() - t0

    shape = clean.correct.shape  # (M, A, N)
    on_mixture = {AttackName.MIX: attack, AttackName.APGD: adaptive, AttackName.AUTOATTACK: autoattack}
    names = [a for a in attacks if a in on_mixture]
    results = {a.value: (np.zeros(shape, bool), np.zeros(shape)) for a in names}
    for name in names:
        t0 = time.perf_counter()
        reused = reuse and name in (AttackName.MIX, AttackName.APGD)
        alpha0, alpha1 = ((judged["std"], judged["rob"]) if name is AttackName.MIX else (own.get("g"), own.get("h")))
        kept = {(m, a): clean.correct[m, a] if skip_misclassified or name is not AttackName.MIX else None
                for m, option in enumerate(options) for a, alpha in enumerate(alphas)
                if not (reused and (alpha == 0.0 or alpha == 1.0 and option.h_map.identity))}
        total = sum(int(k.sum()) if k is not None else len(y) for k in kept.values())
        label = {AttackName.MIX: attack_label(attack), AttackName.AUTOATTACK: "AutoAttack"}.get(
            name, getattr(adaptive, "label", "adaptive attack"))
        with progress.stage(f"{name.value.upper()} attacks ({label} on the mixture, {len(kept)} alpha x option)",
                            total) as shown:
            for (m, option), (a, alpha) in itertools.product(enumerate(options), enumerate(alphas)):
                correct, gap = results[name.value][0][m, a], results[name.value][1][m, a]
                if (m, a) not in kept:  # alpha 0 / 1: the mixture is g / h (unmapped), attacked as g / h already
                    src = alpha0 if alpha == 0.0 else alpha1
                    correct[:], gap[:] = src.correct[m, a], src.gap[m, a]
                else:
                    sweep.single[m].alpha = alpha
                    shown.detail = f"alpha {alpha:g}, {option.label}"
                    idx = sweep.indices(kept[m, a])
                    parts = sweep.run_attack(on_mixture[name], sweep.single[m], idx, shown,
                                             functools.partial(sweep.judge_single, m, alpha))
                    correct[:], gap[:] = clean.correct[m, a], clean.gap[m, a]
                    if parts:
                        correct[idx], gap[idx] = (np.concatenate(p) for p in zip(*parts))
                if name is AttackName.APGD:
                    # the log-mixture (and a map on h's logits, more so) can flatten the gradient an attack on the
                    # mixture follows: the adaptive attack's images on g and on h alone, judged by this mixture
                    # already, count against it too (at every alpha, reused or attacked)
                    correct &= own["g"].correct[m, a] & own["h"].correct[m, a]
                log.info("%s %s alpha=%g: accuracy %.4f", name.value.upper(), option.label, alpha,
                         float((correct & clean.correct[m, a]).mean()) if correct.size else float("nan"))
        timings[name.value] = time.perf_counter() - t0

    mix_outcomes = {CLEAN: clean.correct}
    for name in attacks:
        mix_outcomes[name.value] = judged[name.value].correct if name.value in judged else results[name.value][0]
    base = {k: {CLEAN: clean.base[k][0], "std": judged["std"].base[k][0], "rob": judged["rob"].base[k][0],
                **({"apgd": own[k].base[k][0]} if k in own else {})} for k in ("g", "h")}
    outcomes = Outcomes(
        alphas=np.asarray(alphas, dtype=np.float64), options=options, attacks=tuple(a.value for a in attacks),
        mix=mix_outcomes, base=base,
        index=np.arange(y.shape[0]) if index is None else np.asarray(torch.as_tensor(index).cpu(), dtype=np.int64),
        labels=y.cpu().numpy(), norm=attack.norm.value, eps=attack.eps, steps=attack.steps,
        meta={"attack": repr(attack), "autoattack": repr(autoattack) if autoattack is not None else None,
              "adaptive": repr(adaptive) if adaptive is not None else None,
              "apgd_steps": getattr(adaptive, "steps", None) if AttackName.APGD in attacks else None,
              "skip_misclassified": skip_misclassified, "reuse": reuse, "detach_r": detach_r,
              "implementations": implementations(attack, autoattack, adaptive),
              "labels": attack_labels(attack, autoattack, adaptive, detached)},
    )
    for message in strength_warnings(outcomes):
        log.warning("%s", message)
        warnings.append(message)
    gaps = {"g/clean": clean.base["g"][1], "g/std": judged["std"].base["g"][1], "h/clean": clean.base["h"][1],
            "h/rob": judged["rob"].base["h"][1], "mix/clean": clean.gap}
    if "mix" in results:
        gaps["mix/mix"] = results["mix"][1]
    return SweepResult(outcomes, margins_from(outcomes, gaps), warnings, timings, gaps)


def _attacked(gap: np.ndarray, correct: np.ndarray, clean_correct: np.ndarray) -> dict:
    """Margins on attacked images of the clean-correct examples, split into survived / broken."""
    return margin_summary(gap[clean_correct], correct[clean_correct])


def margins_from(outcomes: Outcomes, gaps: dict[str, np.ndarray]) -> dict:
    """margins.json: g and h on clean / own-PGD images; each mixture on clean / MIX images."""
    out = {}
    for model, own in (("g", "std"), ("h", "rob")):
        ok = outcomes.base[model][CLEAN]
        out[model] = {"clean": margin_summary(gaps[f"{model}/clean"], ok),
                      "attacked": _attacked(gaps[f"{model}/{own}"], outcomes.base[model][own], ok), "attack": own}
    clean, mix = outcomes.mix[CLEAN], "mix/mix" in gaps
    out["mix"] = [
        {"alpha": alpha, "r_option": o.r_option.value, "mix_space": o.mix_space.value, "h_map": o.h_map.label,
         "attack": "mix" if mix else None,
         "clean": margin_summary(gaps["mix/clean"][m, a], clean[m, a]),
         "attacked": _attacked(gaps["mix/mix"][m, a], outcomes.mix["mix"][m, a], clean[m, a]) if mix else None}
        for m, o in enumerate(outcomes.options) for a, alpha in enumerate(outcomes.alphas.tolist())
    ]
    return out
