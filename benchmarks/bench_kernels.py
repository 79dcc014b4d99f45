"""The sweep's attacks eager vs channels_last vs compiled (``run_sweep(channels_last=..., compile=...)``).

One process, the same models and images: the alpha sweep with STD, ROB, MIX (PGD, early exit) and the adaptive
attack (apgd) runs eager float32 first, then with g and h in channels_last memory format, then compiled
(``torch.compile``, dynamic shapes), then both; the table gives each one's wall time, its ratio to eager, and
whether every accuracy equals eager's. The compiled runs are timed twice on the same models: the first includes
compilation.

    python benchmarks/bench_kernels.py                                     # digits checkpoints, CPU
    python benchmarks/bench_kernels.py --arch resnet18 --input-shape 3 32 32 --n 512 --device cuda

Without --g/--h, the digits checkpoints of ``experiment=digits_mix`` (or, with --arch, two random networks of that
architecture on random images: only the timing means something then).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from mixrobust import load_classifier
from mixrobust.attacks import PGD, AdaptiveMixAttack
from mixrobust.data import DigitsDataModule
from mixrobust.evaluation import run_sweep
from mixrobust.models import create_model

DEFAULT = {"g": "outputs/digits/g/checkpoints/best.ckpt", "h": "outputs/digits/h/checkpoints/best.ckpt"}
ALPHAS = [0.0, 0.5, 0.6, 0.7, 0.8, 1.0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--g"), parser.add_argument("--h")
    parser.add_argument("--arch", default=None, help="random networks of this registered architecture instead")
    parser.add_argument("--input-shape", type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument("--n", type=int, default=360)
    parser.add_argument("--eps", type=float, default=None, help="default: h's training eps (8/255 with --arch)")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps")
    parser.add_argument("--apgd-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    if args.arch:
        torch.manual_seed(0)
        shape = tuple(args.input_shape)
        g, h = (create_model(args.arch, 10, shape, [0.5] * shape[0], [0.25] * shape[0]).eval() for _ in range(2))
        x, y = torch.rand(args.n, *shape), torch.randint(0, 10, (args.n,))
        eps, origin = args.eps or 8 / 255, f"random {args.arch} networks, random images"
    else:
        g, h = load_classifier(args.g or DEFAULT["g"]), load_classifier(args.h or DEFAULT["h"])
        x, y = DigitsDataModule().eval_tensors("test")
        x, y = x[: args.n], y[: args.n]
        eps = args.eps or float(h.record["threat"]["eps"])
        origin = f"checkpoints {args.g or DEFAULT['g']}, {args.h or DEFAULT['h']}"
    g, h, x, y = g.to(device), h.to(device), x.to(device), y.to(device)
    attack = PGD("linf", eps=eps, step_size=2.5 * eps / args.steps, steps=args.steps, early_exit=True)
    adaptive = AdaptiveMixAttack("linf", eps=eps, steps=args.apgd_steps)
    common = dict(alphas=ALPHAS, attack=attack, attacks=["std", "rob", "mix", "apgd"], adaptive=adaptive,
                  batch_size=args.batch, preflight=False)
    print(f"models: {origin}; {len(y)} images on {device}; eps {eps:g}; PGD-{args.steps}, "
          f"{adaptive.label}; torch threads {torch.get_num_threads()}")

    def timed(gg, hh, **kw) -> tuple[float, list]:
        _sync(device)
        start = time.perf_counter()
        rows = run_sweep(gg, hh, x, y, **common, **kw).rows()
        _sync(device)
        return time.perf_counter() - start, [(r["model"], r["alpha"], r["attack"], r["accuracy"]) for r in rows]

    eager_s, eager_rows = timed(copy.deepcopy(g), copy.deepcopy(h))
    runs = [("eager float32", eager_s, True)]
    for name, kw in (("channels_last", {"channels_last": True}), ("compile", {"compile": True}),
                     ("channels_last + compile", {"channels_last": True, "compile": True})):
        gg, hh = copy.deepcopy(g), copy.deepcopy(h)
        for repeat in range(2 if kw.get("compile") else 1):  # the first compiled run includes compiling
            seconds, rows = timed(gg, hh, **kw)
            runs.append((name + (" (1st: compiling)" if kw.get("compile") and repeat == 0 else ""), seconds,
                         rows == eager_rows))
    print(f"\n{'':<44}{'seconds':>9}{'x eager':>9}  accuracies")
    for name, seconds, same in runs:
        print(f"{name:<44}{seconds:>9.2f}{eager_s / seconds:>9.2f}  {'= eager' if same else 'DIFFER from eager'}")


if __name__ == "__main__":
    main()
