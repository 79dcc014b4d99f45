"""Soundness, measured: attack the mixture inside its sound certified radius and count prediction flips.

On MNIST with g a standard model and h a Gaussian-noise model (sigma = 0.5), for each alpha:

1. certify h^alpha soundly (`mixrobust.certify.mixture.certify_mixture`, mode ``sound``: Cohen-style
   n0 selection + n estimation hard votes, Clopper-Pearson, ``failure_prob``); a point is attacked
   if its certified radius (the larger of Theorems 4 and 5) is > 0;
2. run an l_2 PGD attack on h^alpha = log((1 - alpha) g + alpha h), h the differentiable smoothed
   estimate (`SmoothedClassifier.forward`: mean softmax of ``--attack-samples`` noise draws, fresh
   noise every step), with a per-example ball whose radius is that point's certificate, maximising
   the margin max_{j != y} h^alpha_j - h^alpha_y against the certified class y;
3. judge the mixture at the attacked point with the *sound* smoothed h: simultaneous
   Clopper-Pearson bounds on every h_c(x') from fresh hard votes (``--check-n``; first 1,000, then
   the full count where undecided, ``--check-fp`` split over both looks and all classes). The
   mixture's sound prediction is c if its lower bound beats every other class's upper bound, else
   undecided. A flip is a sound prediction other than y; undecided points are counted apart.

Expected: no flips beyond what failure_prob (and check-fp) allow. ``--scales 1 3`` also attacks
balls 3x the certificate, where flips should appear: evidence that the attack itself is not weak.

    OMP_NUM_THREADS=1 python benchmarks/soundness_attack.py --data-root ../shared/data --bf16   # ~10 min
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn

from mixrobust.certify import SmoothedClassifier
from mixrobust.certify.bounds import clopper_pearson_lower, clopper_pearson_upper
from mixrobust.certify.mixture import certify_mixture, sample_votes
from mixrobust.checkpoint import load_classifier
from mixrobust.data import MNISTDataModule
from mixrobust.mixing import mix_log_probs
from mixrobust.threat import batch_norm


class FastBase(nn.Module):
    """`model` in channels_last under bfloat16 autocast, float32 logits out (about 3x faster on a CPU
    with avx512_bf16). With ``--bf16`` this wrapper *is* h's base classifier in every step (certify,
    attack, check), so the soundness statement is about this one deterministic classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x.contiguous(memory_format=torch.channels_last)).float()


def mixture_log_probs(g, smoothed: SmoothedClassifier, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """h^alpha(x) = log((1 - alpha) g(x) + alpha h(x)) -> (N, K), h the smoothed soft estimate (fresh noise)."""
    return mix_log_probs(torch.log_softmax(g(x), dim=1), smoothed(x), [alpha])[0]  # smoothed(x) is log h(x)


def pgd_l2_per_example(g, smoothed, x, y, alpha, eps, steps: int, step_factor: float = 2.5):
    """l_2 PGD with a per-example radius `eps` (N,), step ``step_factor * eps / steps``, from x.

    Maximises the margin max_{j != y} z_j - z_y of the mixture h^alpha; returns the iterate with the
    highest (estimated) margin seen, in [0,1] and within each example's ball, that margin and the
    estimated margin at x itself (N,) each.
    """
    view = (-1,) + (1,) * (x.ndim - 1)
    radius, step = eps.view(view), (step_factor * eps / steps).view(view)
    x_adv, best, best_margin = x.clone(), x.clone(), torch.full_like(eps, -math.inf)
    start_margin = None  # the margin at x, set by the first pass
    for it in range(steps + 1):  # the last pass only scores the final iterate
        last = it == steps
        with torch.set_grad_enabled(not last):
            x_adv.requires_grad_(not last)
            z = mixture_log_probs(g, smoothed, x_adv, alpha)  # (N, K)
            z_y = z.gather(1, y[:, None]).squeeze(1)
            margin = z.scatter(1, y[:, None], -math.inf).amax(dim=1) - z_y  # (N,)
        with torch.no_grad():
            if it == 0:
                start_margin = margin.detach()
            better = margin > best_margin
            best[better], best_margin[better] = x_adv[better].detach(), margin[better].detach()
        if last:
            break
        (grad,) = torch.autograd.grad(margin.sum(), x_adv)
        with torch.no_grad():
            g_norm = batch_norm(grad, 2.0).clamp_min(1e-12).view(view)
            delta = x_adv.detach() + step * grad / g_norm - x
            d_norm = batch_norm(delta, 2.0).view(view)
            x_adv = (x + delta * torch.clamp(radius / d_norm.clamp_min(1e-12), max=1.0)).clamp(0.0, 1.0)
    return best, best_margin, start_margin


def sound_mixture_prediction(g_probs: np.ndarray, counts: np.ndarray, n: int, alpha: np.ndarray, fp: float) -> np.ndarray:
    """Sound prediction of the mixture (N,): c where (1-a) g_c + a lower(h_c) > (1-a) g_j + a upper(h_j)
    for every j != c, with simultaneous Clopper-Pearson bounds (Bonferroni over 2K bounds at level fp), else -1."""
    k = counts.shape[1]
    lo = clopper_pearson_lower(counts, n, fp / (2 * k))  # (N, K)
    hi = clopper_pearson_upper(counts, n, fp / (2 * k))
    a = alpha[:, None]
    m_lo, m_hi = (1 - a) * g_probs + a * lo, (1 - a) * g_probs + a * hi  # (N, K)
    c = m_lo.argmax(axis=1)
    rows = np.arange(len(c))
    others = m_hi.copy()
    others[rows, c] = -np.inf
    return np.where(m_lo[rows, c] > others.max(axis=1), c, -1)


def check_points(g, h, sigma, x_adv, alpha, args, seed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sound (-1 = undecided) and plug-in predictions of the mixture at `x_adv`, and check samples used."""
    checker = SmoothedClassifier(h, sigma, votes="hard", batch_size=args.batch_size, seed=seed)
    with torch.no_grad():
        g_probs = torch.softmax(g(x_adv).double(), dim=1).numpy()
    a = alpha.numpy().astype(np.float64)
    first = min(1000, args.check_n)
    counts = checker.sample_counts(x_adv, first).numpy()
    sound = sound_mixture_prediction(g_probs, counts, first, a, args.check_fp / 2)
    used = np.full(len(a), first)
    plug = ((1 - a[:, None]) * g_probs + a[:, None] * counts / first).argmax(axis=1)
    todo = np.flatnonzero(sound < 0)
    if todo.size and args.check_n > first:
        more = checker.sample_counts(x_adv[todo], args.check_n).numpy()
        sound[todo] = sound_mixture_prediction(g_probs[todo], more, args.check_n, a[todo], args.check_fp / 2)
        plug[todo] = ((1 - a[todo, None]) * g_probs[todo] + a[todo, None] * more / args.check_n).argmax(axis=1)
        used[todo] += args.check_n
    return sound, plug, used


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--g", default="outputs/mnist/g/checkpoints/best.ckpt")
    p.add_argument("--h", default="outputs/mnist/h_rs050/checkpoints/best.ckpt")
    p.add_argument("--data-root", default="data")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.6, 0.8, 1.0])
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=10000, help="estimation samples of the sound certificate")
    p.add_argument("--failure-prob", type=float, default=0.001)
    p.add_argument("--attack-samples", type=int, default=1000, help="noise samples per PGD step (>= 1000)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--attack-batch", type=int, default=4, help="(image, alpha) pairs per attack batch")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="attack radius = scale x certificate")
    p.add_argument("--check-n", type=int, default=10000)
    p.add_argument("--check-fp", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="h's base model in bf16 autocast + channels_last (FastBase)")
    p.add_argument("--out", default=None, help="write the per-point results as JSON here")
    args = p.parse_args()
    if args.attack_samples < 1000:
        p.error("--attack-samples must be >= 1000 (the smoothed estimate the issue asks to attack)")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    g, h = load_classifier(args.g), load_classifier(args.h)
    sigma = float(h.record["sigma"])
    if args.bf16:
        h = FastBase(h)
    x, y = MNISTDataModule(root=args.data_root).eval_tensors("test")
    x, y = x[: args.num_images], y[: args.num_images]

    smoothed = SmoothedClassifier(h, sigma, votes="hard", batch_size=args.batch_size, seed=args.seed)
    votes = sample_votes(smoothed, x, args.n0, args.n, "sound")
    with torch.no_grad():
        g_lp = torch.log_softmax(g(x).double(), dim=1).numpy()
    cert = certify_mixture(votes, g_lp, y, args.alphas, sigma, "sound", args.failure_prob, "complement")
    t_cert = time.perf_counter() - start
    radius = np.maximum(cert.lipschitz_radius, cert.rs_radius)  # (A, N)
    ai, ni = np.nonzero(radius > 0)
    print(f"sigma={sigma} h clean acc (MC) {float((votes.probs.argmax(1) == y.numpy()).mean()):.3f}; "
          f"certified {len(ai)} (alpha, image) pairs in {t_cert:.0f} s")
    for i, a in enumerate(args.alphas):
        ok = radius[i] > 0
        thm5 = float((cert.rs_radius[i] >= cert.lipschitz_radius[i])[ok].mean()) if ok.any() else 0.0
        print(f"  alpha={a}: {ok.sum()}/{len(y)} certified, radius median "
              f"{np.median(radius[i][ok]) if ok.any() else 0:.3f} (Thm 5 larger on {thm5:.2f})")

    attacker = SmoothedClassifier(h, sigma, batch_size=args.batch_size, seed=args.seed + 7,
                                  n_forward=args.attack_samples)
    results = []
    for scale in args.scales:
        t0 = time.perf_counter()
        adv, margins = [], []  # pairs are ordered alpha-major (np.nonzero), so each batch has one alpha
        for i, a in enumerate(args.alphas):
            pts = np.flatnonzero(ai == i)
            for s in range(0, len(pts), args.attack_batch):
                j = ni[pts[s : s + args.attack_batch]]
                eb = torch.as_tensor(scale * radius[i, j], dtype=torch.float32)
                xa, m_best, m_start = pgd_l2_per_example(g, attacker, x[j], torch.as_tensor(cert.h_pred[j]), a, eb,
                                                         args.steps)
                adv.append(xa)
                margins.append(torch.stack([m_start, m_best], dim=1))
        x_adv = torch.cat(adv) if adv else x[:0]
        margins = torch.cat(margins).numpy() if margins else np.zeros((0, 2))  # (P, 2) estimated, start / best
        t_attack = time.perf_counter() - t0
        alpha_pts = torch.as_tensor(np.asarray(args.alphas)[ai], dtype=torch.float32)
        sound, plug, used = check_points(g, h, sigma, x_adv, alpha_pts, args, seed=args.seed + 11 + int(scale * 100))
        t_check = time.perf_counter() - t0 - t_attack
        dist = batch_norm(x_adv - x[ni], 2.0).numpy() if len(ai) else np.zeros(0)
        target = cert.h_pred[ni]
        for i, a in enumerate(args.alphas):
            sel = ai == i
            row = {"scale": scale, "alpha": a, "attempts": int(sel.sum()),
                   "flips": int(((sound != target) & (sound >= 0))[sel].sum()),
                   "undecided": int((sound < 0)[sel].sum()),
                   "plugin_flips": int((plug != target)[sel].sum()),
                   "median_margin_start": float(np.median(margins[sel, 0])) if sel.any() else None,
                   "median_margin_attacked": float(np.median(margins[sel, 1])) if sel.any() else None,
                   "max_dist_over_radius": float((dist[sel] / (scale * radius[i, ni[sel]])).max()) if sel.any() else 0.0}
            results.append(row)
            print(f"scale {scale:g} alpha {a}: attempts {row['attempts']}, flips {row['flips']}, undecided "
                  f"{row['undecided']}, plug-in flips {row['plugin_flips']} (max ||d||/r {row['max_dist_over_radius']:.3f}; "
                  f"median est. margin {row['median_margin_start']:.3g} -> {row['median_margin_attacked']:.3g})")
        print(f"  attack {t_attack:.0f} s ({args.steps} steps x {args.attack_samples} samples), check {t_check:.0f} s "
              f"(mean {used.mean() if used.size else 0:.0f} samples/point)")
    total = time.perf_counter() - start
    print(f"total {total:.0f} s; failure_prob {args.failure_prob} per certificate: expected flips at scale 1 "
          f"<= {args.failure_prob * int((radius > 0).sum()):.3f} (+ check failure {args.check_fp})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "seconds": total, "certify_seconds": t_cert}, f, indent=2)


if __name__ == "__main__":
    main()
