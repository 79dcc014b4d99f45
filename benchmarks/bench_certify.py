"""Throughput of randomized-smoothing CERTIFY: mixrobust's batched sampler vs a per-image loop.

The reference follows the structure of Cohen et al.'s `Smooth.certify` (github.com/locuslab/smoothing):
one image at a time, ``x.repeat`` to a fixed batch of noise per forward pass (``--batch``, 1,000
as in its certify.py), predictions moved to numpy and counted there element by element, a
Clopper-Pearson bound per image. mixrobust's `SmoothedClassifier.certify` draws each image's noise
from its own stream, packs small-n images into shared passes, counts on the device, feeds the
model channels-last batches and uses the device's default pass size (64 noisy images on a CPU,
where activations then stay in a core's cache; 4,000 on a GPU) unless ``--our-batch`` is given. On
a CPU it runs one single-threaded pass per thread at a time (``--workers``), where the reference's
passes are split across the threads. Both use
the same weights (separate copies), n0, n and failure probability. ``--channels-last`` gives the
reference channels-last too (a tuned peer, to separate that gain from the rest).

    python benchmarks/bench_certify.py --n 100000 --num-images 2             # small_cnn, 1x28x28
    python benchmarks/bench_certify.py --arch resnet110 --input-shape 3 32 32 --device cuda --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time

import numpy as np
import torch
from scipy import stats
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from mixrobust.certify import SmoothedClassifier
from mixrobust.models import available_models, create_model


class ReferenceSmooth:
    """Per-image CERTIFY in the style of Cohen et al.'s reference implementation."""

    def __init__(self, base: nn.Module, num_classes: int, sigma: float):
        self.base, self.num_classes, self.sigma = base, num_classes, sigma

    def certify(self, x: torch.Tensor, n0: int, n: int, failure_prob: float, batch_size: int):
        counts0 = self._sample_noise(x, n0, batch_size)
        c_a = int(counts0.argmax())
        counts = self._sample_noise(x, n, batch_size)
        p_a = proportion_confint(counts[c_a], n, alpha=2 * failure_prob, method="beta")[0]
        return (c_a, float(self.sigma * stats.norm.ppf(p_a))) if p_a > 0.5 else (-1, 0.0)

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            for _ in range(math.ceil(num / batch_size)):
                this_batch = min(batch_size, num)
                num -= this_batch
                batch = x.repeat((this_batch, 1, 1, 1))
                noise = torch.randn_like(batch) * self.sigma
                predictions = self.base(batch + noise).argmax(1)
                counts += self._count_arr(predictions.cpu().numpy(), self.num_classes)
            return counts

    @staticmethod
    def _count_arr(arr: np.ndarray, length: int) -> np.ndarray:
        counts = np.zeros(length, dtype=int)
        for idx in arr:
            counts[idx] += 1
        return counts


class ChannelsLast(nn.Module):
    """Feeds the base model channels-last inputs (its weights are converted once)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base.to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.base(x.contiguous(memory_format=torch.channels_last))


def load_images(kind: str, num: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(num, *shape, generator=gen)
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = torch.tensor(load_digits().images[:num], dtype=torch.float32).unsqueeze(1) / 16.0
    digits = torch.nn.functional.interpolate(digits, size=shape[1:], mode="bilinear", align_corners=False)
    return digits.expand(-1, shape[0], -1, -1).contiguous()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_only(model: nn.Module, x: torch.Tensor, samples: int, batch: int, repeats: int) -> float:
    """Seconds per image of the bare forward passes: `samples` inputs per image in passes of `batch`,
    channels-last, made before the clock starts (no noise, no counting)."""
    device = x.device
    inputs = x[:1].expand(batch, *x.shape[1:]).contiguous(memory_format=torch.channels_last)
    sizes = [batch] * (samples // batch) + ([samples % batch] if samples % batch else [])
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for size in sizes:
            model(inputs[:size])
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="small_cnn", help=f"registered model: {', '.join(available_models())}")
    ap.add_argument("--input-shape", type=int, nargs=3, default=(1, 28, 28), metavar=("C", "H", "W"))
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--data", choices=("random", "digits"), default="random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--num-images", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1000, help="the reference's noise batch")
    ap.add_argument("--our-batch", type=int, default=None, help="mixrobust's pass size (default: the device's)")
    ap.add_argument("--workers", type=int, default=None, help="mixrobust's concurrent CPU passes (default: threads)")
    ap.add_argument("--compile", action="store_true", help="mixrobust's passes through torch.compile")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--failure-prob", type=float, default=0.001)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (both implementations)")
    ap.add_argument("--channels-last", action="store_true", help="channels-last inputs for the reference too")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--compute-only", action="store_true",
                    help="also time the model passes alone (n0 + n pre-made inputs per image at our pass size)")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds (alternating); the best is reported")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    c = args.input_shape[0]
    base = create_model(args.arch, args.num_classes, args.input_shape, [0.5] * c, [0.25] * c)
    base = base.to(device).eval()
    ours_base = copy.deepcopy(base)  # mixrobust converts its copy's weights to channels-last
    if args.channels_last:
        base = ChannelsLast(base)
    x = load_images(args.data, args.num_images, tuple(args.input_shape), args.seed).to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    )

    ours = SmoothedClassifier(ours_base, args.sigma, votes="hard", batch_size=args.our_batch, seed=args.seed,
                              workers=args.workers, compile=args.compile,
                              autocast_dtype="bfloat16" if args.bf16 else None)  # per thread: its workers too
    ref = ReferenceSmooth(base, args.num_classes, args.sigma)
    with autocast, torch.no_grad():
        # warm-up of both paths (kernel selection, allocator, compilation of our pass shapes), untimed
        ours.certify(x, args.n0, max(args.n0, min(args.n, ours._batch(x))), args.failure_prob)
        ref.certify(x[0], args.n0, min(args.n, args.batch), args.failure_prob, args.batch)
        t_ours, t_ref = [], []
        for _ in range(args.repeats):  # alternate, keep the best of each
            sync(device)
            t0 = time.perf_counter()
            pred, radius, _ = ours.certify(x, args.n0, args.n, args.failure_prob)
            sync(device)
            t_ours.append((time.perf_counter() - t0) / args.num_images)
            if not args.skip_reference:
                t0 = time.perf_counter()
                ref_out = [
                    ref.certify(xi, args.n0, args.n, args.failure_prob, args.batch) for xi in x
                ]
                sync(device)
                t_ref.append((time.perf_counter() - t0) / args.num_images)
        t_ours, t_ref = min(t_ours), min(t_ref, default=float("nan"))
        if args.compute_only:
            t_compute = compute_only(ours_base, x, args.n0 + args.n, ours._batch(x), args.repeats)

    options = (("bf16", args.bf16), ("channels_last", args.channels_last), ("compile", args.compile))
    flags = [f for f, on in options if on]
    print(
        f"{args.arch} {tuple(args.input_shape)} on {device} ({torch.get_num_threads()} threads)"
        f" {' '.join(flags)}: n0={args.n0} n={args.n} reference batch={args.batch}"
        f" our batch={ours._batch(x)} images={args.num_images}"
    )
    radii = [round(r, 4) for r in radius.tolist()]
    print(f"  mixrobust batched : {t_ours:.4f} s/image   pred={pred.tolist()} radius={radii}")
    if not args.skip_reference:
        print(
            f"  per-image loop    : {t_ref:.4f} s/image   pred={[p for p, _ in ref_out]}"
            f" radius={[round(r, 4) for _, r in ref_out]}"
        )
        print(f"  throughput ratio  : {t_ref / t_ours:.2f}x")
    if args.compute_only:
        print(f"  model passes alone: {t_compute:.4f} s/image   (ours / passes alone: {t_ours / t_compute:.2f})")


if __name__ == "__main__":
    main()
