"""Cost of an 11-alpha sweep (clean, STD, ROB, MIX; every accuracy on every example) with the
evaluation engine vs every (alpha, attack) pair from scratch, on the same models and batch.

    python benchmarks/bench_sweep.py [--g CKPT --h CKPT] [--n 360] [--steps 20]

Counts model passes (forward calls of g or h, each on the whole batch) and the images they
process with a counting wrapper, then wall time. The issue's count: from scratch each alpha
costs STD 20 + ROB 20 + MIX 40 passes (880 for 11 alphas); with STD and ROB computed once and
MIX at alpha 0 and 1 reused, 400 (2.2x). Our PGD adds one gradient-free pass per attack (the
final iterate's check) and judging adversarial images costs passes too; both are counted. Also
checks that every computation reports the same accuracies. "+ early exit": MIX drops each example at its
first fooling point (`PGD.early_exit`; STD and ROB images stay full searches). Without --g/--h the digits checkpoints of `experiment=digits_mix` are used if
present, else two small CNNs fitted here for a few full-batch steps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from mixrobust import load_classifier
from mixrobust.attacks import PGD
from mixrobust.data import DigitsDataModule
from mixrobust.evaluation import reference_sweep, run_sweep
from mixrobust.models import create_model

DEFAULT = {"g": "outputs/digits/g/checkpoints/best.ckpt", "h": "outputs/digits/h/checkpoints/best.ckpt"}
ALPHAS = [i / 10 for i in range(11)]


class Counting(nn.Module):
    """Counts forward calls of the wrapped classifier; keeps its num_classes / input_shape."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls, self.images = model, 0, 0
        self.num_classes, self.input_shape = model.num_classes, model.input_shape

    def forward(self, x):
        self.calls += 1
        self.images += x.shape[0]
        return self.model(x)


def fitted(seed: int) -> nn.Module:
    xt, yt = DigitsDataModule().eval_tensors("train")
    torch.manual_seed(seed)
    model = create_model("small_cnn", 10, (1, 8, 8), [0.5], [0.25])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def models(args) -> tuple[nn.Module, nn.Module, str]:
    paths = {k: getattr(args, k) or DEFAULT[k] for k in ("g", "h")}
    if all(Path(p).is_file() for p in paths.values()):
        return load_classifier(paths["g"]), load_classifier(paths["h"]), f"checkpoints {paths['g']}, {paths['h']}"
    return fitted(0), fitted(1), "two small CNNs fitted for 30 full-batch steps (no checkpoints found)"


def measure(name: str, g: Counting, h: Counting, fn) -> dict:
    g.calls = h.calls = g.images = h.images = 0
    start = time.perf_counter()
    out = fn()
    return {"name": name, "g": g.calls, "h": h.calls, "passes": g.calls + h.calls, "images": g.images + h.images,
            "seconds": time.perf_counter() - start, "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--g"), parser.add_argument("--h")
    parser.add_argument("--n", type=int, default=360)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--step-size", type=float, default=0.05)
    args = parser.parse_args()

    g0, h0, origin = models(args)
    g, h = Counting(g0), Counting(h0)
    x, y = DigitsDataModule().eval_tensors("test")
    x, y = x[: args.n], y[: args.n]
    n = x.shape[0]
    attack = PGD("linf", eps=args.eps, step_size=args.step_size, steps=args.steps)
    common = dict(alphas=ALPHAS, attack=attack, batch_size=n, preflight=False)
    print(f"models: {origin}\nbatch: {n} digits test images, one batch; {attack}; torch threads "
          f"{torch.get_num_threads()}\n")

    runs = [
        measure("from scratch", g, h, lambda: reference_sweep(g, h, x, y, alphas=ALPHAS, attack=attack, batch_size=n)),
        measure("engine", g, h, lambda: run_sweep(g, h, x, y, skip_misclassified=False, **common)),
        measure("engine + skip", g, h, lambda: run_sweep(g, h, x, y, **common)),
        measure("+ early exit", g, h, lambda: run_sweep(g, h, x, y, **{**common, "attack": attack.with_early_exit()})),
    ]
    ref = runs[0]["out"]
    endpoint_diff = []
    for run in runs[1:]:
        mix = run["out"].outcomes.mix
        for key in ("clean", "std", "rob", "mix"):
            ours = (mix[key][0] & mix["clean"][0]).sum(axis=1)  # (A,) examples counted
            theirs = (ref[key] & ref["clean"]).sum(axis=1)
            inner = slice(1, -1) if key == "mix" else slice(None)  # MIX at alpha 0 / 1 is reused
            if (ours[inner] != theirs[inner]).any():
                raise SystemExit(f"{run['name']}: {key} accuracy differs from scratch: {ours} vs {theirs}")
            if key == "mix":
                endpoint_diff.append(f"{run['name']}: alpha 0 {ours[0]} vs {theirs[0]}, "
                                     f"alpha 1 {ours[-1]} vs {theirs[-1]}")

    print(f"{'':<15}{'g passes':>10}{'h passes':>10}{'total':>8}{'images':>9}{'seconds':>9}"
          f"{'passes x':>10}{'images x':>10}{'time x':>8}")
    base = runs[0]
    for run in runs:
        print(f"{run['name']:<15}{run['g']:>10}{run['h']:>10}{run['passes']:>8}{run['images']:>9}"
              f"{run['seconds']:>9.2f}{base['passes'] / run['passes']:>10.2f}"
              f"{base['images'] / run['images']:>10.2f}{base['seconds'] / run['seconds']:>8.2f}")
    print("(passes: forward calls of g or h on a batch; images: the images those calls processed)")
    s = args.steps
    print(f"\nissue's count (PGD-{s}): from scratch {11 * 4 * s} passes, with reuse {2 * s + 9 * 2 * s} "
          f"-> {11 * 4 * s / (2 * s + 9 * 2 * s):.2f}x")
    print("accuracies: engine == from scratch for clean, STD, ROB and MIX at 0 < alpha < 1; robust examples "
          "under MIX at the endpoints (engine: PGD on g / h; from scratch: PGD on log_softmax(g) / (h)):")
    for line in endpoint_diff:
        print("  " + line)
    acc = runs[1]["out"].rows()
    for row in acc:
        if row["model"] == "mix" and row["attack"] in ("clean", "mix") and row["alpha"] in (0.0, 0.5, 1.0):
            print(f"  alpha {row['alpha']:.1f} {row['attack']:<6} {row['accuracy']:.4f}")


if __name__ == "__main__":
    main()
