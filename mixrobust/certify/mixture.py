"""Certify the mixture h^alpha = log((1 - alpha) g + alpha h) of a classifier g and a Gaussian-smoothed h.

h is sampled once (`sample_votes`); the radii of every alpha (Theorems 4 and 5, closed form in
alpha) and the mixture's clean predictions then follow from the same counts (`certify_mixture`),
so a whole alpha sweep costs one Monte Carlo run. The RS baseline is certified with Cohen et
al.'s CERTIFY (`certify_baseline`).

Counting rule (method.md): a point counts as certified at radius r only if h's prediction (not
the mixture's) is correct there and its radius is > 0 and >= r. The radii stored here are
already 0 where h is wrong or abstains, and for every alpha < 1/2.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from mixrobust.certify.radii import _np, certified_accuracy, check_alpha
from mixrobust.certify.smoothing import SmoothedClassifier
from mixrobust.certify.sound import MixtureRadii, plugin_radii, sound_radii
from mixrobust.errors import ConfigError, check_choice
from mixrobust.mixing import mix_log_probs
from mixrobust.runtime import progress

Mode = Literal["sound", "plugin"]
Theorem = Literal["lipschitz", "rs"]
_CHUNK = 1 << 24  # alpha x example x class entries per mixture evaluation


@dataclass
class Votes:
    """Monte Carlo votes of a smoothed model on N images (numpy, (N, K) each).

    `select`: n0 selection samples (None in plug-in mode); `est`: the sum of ``n`` estimation
    samples (hard-vote counts or summed softmaxes); `est_sq`: summed squared softmaxes (soft votes
    with empirical Bernstein bounds), else None.
    """

    select: np.ndarray | None
    est: np.ndarray
    n: int
    votes: str
    est_sq: np.ndarray | None = None

    @property
    def probs(self) -> np.ndarray:
        """The Monte Carlo estimate of the smoothed probabilities, (N, K)."""
        return self.est / self.n


def concat_votes(parts: Sequence[Votes]) -> Votes:
    """The votes of disjoint image shards joined in order (as if sampled in one call)."""
    def cat(name):
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    return Votes(cat("select"), cat("est"), parts[0].n, parts[0].votes, cat("est_sq"))


def sample_votes(
    smoothed: SmoothedClassifier, x: torch.Tensor, n0: int, n: int, mode: Mode = "sound", soft_bound: str = "hoeffding",
    keys=None,
) -> Votes:
    """Draw the votes a certification needs, selection samples first (as `SmoothedClassifier.certify`).

    Sound mode: n0 selection and n estimation samples per image; plug-in mode: n estimation
    samples only. With soft votes and ``soft_bound="bernstein"`` the squared softmaxes are summed too.
    `keys` (N,) name the images' noise streams (their positions in the split; default 0..N-1).
    """
    check_choice("mode", mode, get_args(Mode))
    total = x.shape[0] * (n + (n0 if mode == "sound" else 0))
    with progress.stage(f"noise samples (sigma {smoothed.sigma:g}, {x.shape[0]:,} images)", total, "samples") as shown:
        before, smoothed.on_pass = smoothed.on_pass, shown.advance
        try:
            select = _np(smoothed.sample_counts(x, n0, keys)) if mode == "sound" else None
            sq = None
            if mode == "sound" and smoothed.votes == "soft" and soft_bound == "bernstein":
                est, sq = (_np(t) for t in smoothed.sample_soft_moments(x, n, keys))
            else:
                est = _np(smoothed.sample_counts(x, n, keys))
        finally:
            smoothed.on_pass = before
    return Votes(select, est, int(n), smoothed.votes, sq)


def smoothed_votes(
    base: torch.nn.Module, sigma: float, x: torch.Tensor, keys: torch.Tensor, *, votes: str = "hard", seed: int = 0,
    n0: int, n: int, mode: Mode = "sound", soft_bound: str = "hoeffding", batch_size: int | None = None,
    workers: int | None = None, compile: bool = False, autocast_dtype: str | None = None,
    device: torch.device | None = None,
) -> Votes:
    """The votes of `base` smoothed with noise `sigma` on images `x` (N, C, H, W), their noise streams named by
    `keys` (N,): `SmoothedClassifier` sampled by `sample_votes` on `device` (default x's; the noise is drawn
    there, so the votes depend on the device type, as on its kernels).

    Each image's votes depend only on its own key and `seed`, so the votes of a shard of the images
    are that shard of the votes of all of them (`mixrobust.runtime.sharding.map_shards`).
    """
    device = device or x.device
    smoothed = SmoothedClassifier(base.to(device), sigma, votes=votes, batch_size=batch_size, seed=seed,
                                  workers=workers, compile=compile, autocast_dtype=autocast_dtype)
    return sample_votes(smoothed, x.to(device), n0, n, mode, soft_bound, keys=[int(k) for k in keys.tolist()])


def mixture_predictions(g_log_probs, h_probs, alphas: Sequence[float]) -> np.ndarray:
    """argmax of h^alpha = log((1 - alpha) g + alpha h) per alpha -> (A, N) int64.

    `g_log_probs` (N, K) are g's log-probabilities, `h_probs` (N, K) h's (Monte Carlo) probabilities;
    the mixture is `mixrobust.mixing.mix_log_probs` in float64 (log 0 = -inf for unvoted classes).
    """
    lg = torch.as_tensor(_np(g_log_probs))
    with np.errstate(divide="ignore"):
        lh = torch.as_tensor(np.log(_np(h_probs)))
    alphas = [float(a) for a in alphas]
    step = max(1, _CHUNK // max(1, lg.numel()))
    preds = [mix_log_probs(lg, lh, alphas[i : i + step]).argmax(dim=-1) for i in range(0, len(alphas), step)]
    return torch.cat(preds).numpy() if preds else np.zeros((0, lg.shape[0]), dtype=np.int64)


@dataclass
class MixtureCertificate:
    """Per-example certificates of h^alpha for every alpha in `alphas` (A,) on N examples.

    `h_pred` (N,) is h's class (sound mode: from the selection samples, -1 where h's own prediction
    is not established); `p_y`, `p_runner_up` (N,) are h_y and max_{i != y} h_i (sound mode: the
    lower and upper confidence bounds the radii use; with the ``complement`` bound `p_runner_up` is
    1 - `p_y`, a bound on all other classes together, not an estimate of the runner-up); `mix_pred`
    (A, N) the mixture's prediction on the clean image; `lipschitz_radius`, `rs_radius` (A, N)
    Theorems 4 and 5, 0 where h is wrong.
    """

    alphas: np.ndarray
    labels: np.ndarray
    h_pred: np.ndarray
    mix_pred: np.ndarray
    p_y: np.ndarray
    p_runner_up: np.ndarray
    lipschitz_radius: np.ndarray
    rs_radius: np.ndarray
    mode: str

    @property
    def correct(self) -> np.ndarray:
        """(N,) whether h's prediction is the label (an abstention is wrong)."""
        return self.h_pred == self.labels

    @property
    def clean_accuracy(self) -> np.ndarray:
        """(A,) clean accuracy of the mixture at each alpha."""
        return (self.mix_pred == self.labels[None, :]).mean(axis=1)

    def radius(self, theorem: Theorem) -> np.ndarray:
        """(A, N) radii of Theorem 4 (``lipschitz``) or Theorem 5 (``rs``)."""
        check_choice("theorem", theorem, get_args(Theorem))
        return self.lipschitz_radius if theorem == "lipschitz" else self.rs_radius

    def certified_accuracy(self, theorem: Theorem, grid) -> np.ndarray:
        """(A, G) certified accuracy of h^alpha at every radius of `grid` (G,)."""
        return np.stack([certified_accuracy(r, self.correct, grid) for r in self.radius(theorem)])


def _radii(votes: Votes, alpha: float, sigma: float, mode: str, failure_prob: float, bound: str,
           soft_bound: str, lipschitz) -> MixtureRadii:
    if mode == "plugin":
        return plugin_radii(votes.probs, alpha, sigma=sigma, lipschitz=lipschitz)
    return sound_radii(votes.select, votes.est, votes.n, alpha, sigma, failure_prob, votes=votes.votes, bound=bound,
                       lipschitz=lipschitz, sq_est=votes.est_sq, soft_bound=soft_bound)


def certify_mixture(
    votes: Votes,
    g_log_probs,
    labels,
    alphas: Sequence[float],
    sigma: float,
    mode: Mode = "sound",
    failure_prob: float = 0.001,
    bound: str = "complement",
    soft_bound: str = "hoeffding",
    lipschitz=None,
) -> MixtureCertificate:
    """Certify h^alpha for every alpha from one set of h's votes and g's clean log-probabilities (N, K).

    Sound mode: y from the selection samples, bounds from the estimation samples
    (`mixrobust.certify.sound_radii`; each radius holds with probability at least
    1 - failure_prob over the noise). Plug-in mode: the paper's radii at the Monte Carlo estimate
    (`plugin_radii`; no guarantee). `lipschitz` (Theorem 4's l_2 constant) defaults to
    sqrt(2/pi)/sigma. Alphas below 1/2 give radius 0 (one warning each).
    """
    mode = check_choice("mode", mode, get_args(Mode))
    if mode == "sound" and votes.select is None:
        raise ConfigError("sound certification needs selection samples: draw votes with mode='sound'")
    alphas = np.asarray([float(a) for a in alphas], dtype=np.float64)
    labels = _np(labels).astype(np.int64).reshape(-1)
    num = votes.est.shape[0]
    if labels.shape[0] != num or _np(g_log_probs).shape != votes.est.shape:
        raise ConfigError(f"labels {labels.shape}, g's outputs {_np(g_log_probs).shape} and h's votes "
                          f"{votes.est.shape} must describe the same examples and classes")
    r4, r5 = np.zeros((len(alphas), num)), np.zeros((len(alphas), num))
    ref = None
    for i, alpha in enumerate(alphas):
        if not check_alpha(alpha, warn=False):
            warnings.warn(f"alpha={alpha} < 1/2: the mixture cannot be certified (Lemma 2 needs alpha >= 1/2); "
                          "its radii are 0", stacklevel=2)
            continue
        ref = _radii(votes, alpha, sigma, mode, failure_prob, bound, soft_bound, lipschitz)
        r4[i], r5[i] = _np(ref.lipschitz), _np(ref.rs)
    if ref is None:  # h's prediction and bounds do not depend on alpha
        ref = _radii(votes, 1.0, sigma, mode, failure_prob, bound, soft_bound, lipschitz)
    h_pred = np.asarray(ref.pred, dtype=np.int64)
    wrong = h_pred != labels
    r4[:, wrong], r5[:, wrong] = 0.0, 0.0
    infinite = int(np.isinf(r5).any(axis=0).sum())
    if infinite:  # plug-in only: sound bounds keep the lower bound below 1
        warnings.warn(f"plug-in Theorem 5 radius is infinite on {infinite} of {num} images (alpha 1, every vote "
                      "for one class): they count as certified at every radius; certify.mode=sound gives finite "
                      "radii that hold with probability 1 - failure_prob", stacklevel=2)
    return MixtureCertificate(
        alphas=alphas, labels=labels, h_pred=h_pred,
        mix_pred=mixture_predictions(g_log_probs, votes.probs, alphas),
        p_y=_np(ref.p_lower), p_runner_up=_np(ref.p_upper_other),
        lipschitz_radius=r4, rs_radius=r5, mode=mode,
    )


@dataclass
class BaselineCertificate:
    """Cohen et al.'s CERTIFY of an RS baseline on N examples (numpy, (N,) each).

    `pred` is CERTIFY's class (-1 = abstain), `p_lower` its Clopper-Pearson lower bound, `radius`
    sigma Phi^-1(p_lower) (0 where abstained or wrong); `clean_pred` the Monte Carlo prediction
    argmax of the n estimation votes, which `clean_accuracy` scores like the mixture's.
    """

    labels: np.ndarray
    pred: np.ndarray
    p_lower: np.ndarray
    radius: np.ndarray
    clean_pred: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.labels

    @property
    def clean_accuracy(self) -> float:
        return float((self.clean_pred == self.labels).mean())

    def certified_accuracy(self, grid) -> np.ndarray:
        """(G,) certified accuracy at every radius of `grid`."""
        return certified_accuracy(self.radius, self.correct, grid)


def certify_baseline(votes: Votes, labels, sigma: float, failure_prob: float) -> BaselineCertificate:
    """CERTIFY on hard votes (`sample_votes` in sound mode): class from the selection counts, radius
    sigma Phi^-1(pA) with pA the one-sided Clopper-Pearson lower bound at `failure_prob`, abstain
    where pA <= 1/2. Identical to `SmoothedClassifier.certify` on the same draws (it is Theorem 5
    at alpha = 1 with the complement bound: (sigma/2)(Phi^-1(pA) - Phi^-1(1 - pA)) = sigma Phi^-1(pA)).
    With probability at least 1 - failure_prob per point, a non-abstained prediction is the
    smoothed baseline's at every point within the radius.
    """
    if votes.votes != "hard" or votes.select is None:
        raise ConfigError("the baseline's CERTIFY needs hard votes with selection samples (mode='sound')")
    rad = sound_radii(votes.select, votes.est, votes.n, 1.0, sigma, failure_prob, votes="hard", bound="complement")
    labels = _np(labels).astype(np.int64).reshape(-1)
    pred = np.asarray(rad.pred, dtype=np.int64)
    radius = np.where(pred == labels, _np(rad.rs), 0.0)
    return BaselineCertificate(labels, pred, _np(rad.p_lower), radius, votes.est.argmax(axis=1))


def clean_accuracy_by_alpha(g_log_probs, h_probs, labels, alphas: Sequence[float]) -> np.ndarray:
    """(A,) clean accuracy of h^alpha at each alpha (for the alpha selection on a fine grid)."""
    labels = _np(labels).astype(np.int64).reshape(-1)
    return (mixture_predictions(g_log_probs, h_probs, alphas) == labels[None, :]).mean(axis=1)
