"""Attack strength and cost on the mixture: the adaptive attack (``apgd``) against AutoAttack standard and PGD-20.

On the same images, in the same process, for each alpha: the mixture's robust accuracy (an example counts if
it is right on the clean image and on the attack's image) and the attack's wall time, for

- ``PGD-20``: the paper's MIX attack (cross-entropy on the mixture's outputs, no random start);
- ``apgd``: mixrobust's default adaptive attack (`AdaptiveMixAttack`: APGD-CE, then APGD-DLR, then targeted
  APGD-DLR towards the 5 highest-ranked classes other than the label, on the mixture's outputs,
  early exit; ``--losses``, ``--targets`` and ``--surrogate`` change it);
- ``AutoAttack``: the authors' standard version (pyautoattack, or whichever implementation is installed).

Acceptance (issue 14): apgd within 1 point of AutoAttack (or below it) at every alpha, in at most 1/3 of its
time. Checkpoints are mixrobust checkpoints (g standard, h PGD-AT), e.g. the README's main job:

    python benchmarks/bench_strength.py --g outputs/digits/g/checkpoints/best.ckpt \\
        --h outputs/digits/h/checkpoints/best.ckpt --data digits
    MIXROBUST_DATA_ROOT=../shared/data python benchmarks/bench_strength.py --data mnist --n 200 \\
        --g outputs/mnist/g/checkpoints/best.ckpt --h outputs/mnist/h/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from mixrobust.attacks import PGD, AdaptiveMixAttack, AutoAttack, attack_in_batches
from mixrobust.checkpoint import load_classifier
from mixrobust.mixing import MixedClassifier


def _data(name: str, n: int | None):
    from mixrobust.data.datasets import DigitsDataModule, MNISTDataModule

    module = DigitsDataModule() if name == "digits" else MNISTDataModule(root=os.environ.get("MIXROBUST_DATA_ROOT"))
    x, y = module.eval_tensors("test")
    return (x, y) if n is None else (x[:n], y[:n])


def _robust(model, x, x_adv, y) -> float:
    with torch.no_grad():
        return 100.0 * ((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--g", required=True)
    parser.add_argument("--h", required=True)
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--n", type=int, default=None, help="first n test images (default all)")
    parser.add_argument("--eps", type=float, default=None, help="default: h's training eps")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.6, 0.7, 0.8, 1.0])
    parser.add_argument("--steps", type=int, default=100, help="the adaptive attack's steps per search")
    parser.add_argument("--losses", nargs="+", default=None, help="the adaptive attack's stages (default: its own)")
    parser.add_argument("--targets", type=int, default=None, help="targeted classes (default: the attack's own)")
    parser.add_argument("--surrogate", action="store_true", help="the adaptive attack follows the logit-space surrogate")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    g, h = load_classifier(args.g), load_classifier(args.h)
    eps = args.eps if args.eps is not None else float(h.record["threat"]["eps"])
    x, y = _data(args.data, args.n)
    pgd = PGD("linf", eps=eps, step_size=2.5 * eps / 20, steps=20)
    chosen = {k: v for k, v in (("losses", args.losses), ("targets", args.targets)) if v is not None}
    chosen["surrogate"] = args.surrogate
    ours = AdaptiveMixAttack("linf", eps=eps, steps=args.steps, **chosen)
    autoattack = AutoAttack("linf", eps, g.num_classes, seed=0, batch_size=args.batch)
    print(f"{args.data}: {len(y)} test images, l_inf eps={eps:g}; {ours.label} vs {autoattack.provenance}")
    print(f"{'alpha':>5} {'clean':>6} {'PGD-20':>7} {'apgd':>6} {'AA':>6} {'apgd-AA':>8} {'t apgd':>7} {'t AA':>7} "
          f"{'AA/apgd':>8}")
    rows = []
    for alpha in args.alphas:
        mix = MixedClassifier(g, h, alpha)
        with torch.no_grad():
            clean = 100.0 * (mix(x).argmax(1) == y).float().mean().item()
        row = {"alpha": alpha, "clean": clean}
        for name, attack in (("pgd20", pgd), ("apgd", ours), ("autoattack", autoattack)):
            start = time.perf_counter()
            x_adv = attack_in_batches(attack, mix, x, y, args.batch)
            row[f"t_{name}"] = time.perf_counter() - start
            row[name] = _robust(mix, x, x_adv, y)
        rows.append(row)
        print(f"{alpha:5.2f} {clean:6.1f} {row['pgd20']:7.1f} {row['apgd']:6.1f} {row['autoattack']:6.1f} "
              f"{row['apgd'] - row['autoattack']:+8.1f} {row['t_apgd']:6.1f}s {row['t_autoattack']:6.1f}s "
              f"{row['t_autoattack'] / row['t_apgd']:7.1f}x", flush=True)
    worst = max(r["apgd"] - r["autoattack"] for r in rows)
    ratio = min(r["t_autoattack"] / r["t_apgd"] for r in rows)
    print(f"apgd minus AutoAttack: at most {worst:+.1f} points; AutoAttack / apgd time: at least {ratio:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "n": len(y), "eps": eps, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
