"""Throughput of mixrobust's PGD against torchattacks' PGD / PGDL2 with identical settings.

Both attack the same model on the same batch (random images, random labels) with the same norm,
eps, step size and steps, no random start. Each repeat times both (in alternating order, after
warm-up, with a device sync), and the table reports median images per second and their ratio.
mixrobust's PGD counts an example as broken if any point its search visited fooled the model
(torchattacks returns its last iterate only), so the two accuracies are compared under both rules:
torchattacks' last iterate, and torchattacks under ours, every visited point (its k-step run's
result is its longer run's k-th iterate without random start, so runs of 0 .. steps steps give
them all; untimed). Under the same rule the two implementations must agree.

    python benchmarks/bench_pgd.py                                     # small_cnn, 1x28x28, CPU
    python benchmarks/bench_pgd.py --norm l2 --eps 1.0 --step-size 0.25
    python benchmarks/bench_pgd.py --arch resnet18 --input-shape 3 32 32 --device cuda --batch 512
    python benchmarks/bench_pgd.py --arch resnet18 --input-shape 3 32 32 --device cuda --bf16  # ours in bf16
    # a trained model on real test images, our PGD with early exit (examples leave at their first fooling point)
    python benchmarks/bench_pgd.py --ckpt outputs/digits/h/checkpoints/best.ckpt --data digits --early-exit
    # the mixture of two networks (here two random ResNet-18s on a GPU, alpha 0.7)
    python benchmarks/bench_pgd.py --arch resnet18 --input-shape 3 32 32 --device cuda --batch 512 --alpha 0.7

With ``--ckpt`` the model is a mixrobust checkpoint (its threat's eps and step size unless given) and the
batch is the first ``--batch`` test images of ``--data`` (digits, or mnist from MIXROBUST_DATA_ROOT).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mixrobust.attacks import PGD
from mixrobust.checkpoint import load_classifier
from mixrobust.models import available_models, create_model


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _test_images(data: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    import os

    from mixrobust.data.datasets import DigitsDataModule, MNISTDataModule

    module = DigitsDataModule() if data == "digits" else MNISTDataModule(root=os.environ.get("MIXROBUST_DATA_ROOT"))
    x, y = module.eval_tensors("test")
    return x[:n], y[:n]


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def _visited_accuracy(model: torch.nn.Module, make: Callable[[int], Callable], x: torch.Tensor,
                      y: torch.Tensor, steps: int) -> float:
    """Accuracy when an example counts as broken at any iterate 0 .. `steps` of the attack `make(k)` (k steps)."""
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    for k in range(1, steps + 1):
        x_adv = make(k)(x, y)
        with torch.no_grad():
            robust &= model(x_adv).argmax(1) == y
    return 100.0 * robust.float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small_cnn", choices=available_models())
    parser.add_argument("--input-shape", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                        help="default 1 28 28 for small_cnn, else 3 32 32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--norm", choices=["linf", "l2"], default="linf")
    parser.add_argument("--eps", type=float, default=None, help="default 8/255 (linf) or 0.5 (l2)")
    parser.add_argument("--step-size", type=float, default=None, help="default eps / 4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--bf16", action="store_true", help="run *our* forward passes under bf16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and inputs (both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt", default=None, help="a mixrobust checkpoint instead of a random --arch model")
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits", help="test images with --ckpt")
    parser.add_argument("--early-exit", action="store_true", help="ours drops examples at their first fooling point")
    parser.add_argument("--alpha", type=float, default=None,
                        help="attack the mixture (1 - alpha) g + alpha h of the model (as h) and --g (with --ckpt) "
                             "or a second random --arch network")
    parser.add_argument("--g", default=None, help="g's checkpoint for --alpha with --ckpt")
    args = parser.parse_args()

    import torchattacks  # a test dependency, needed only here

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(args.input_shape or ((1, 28, 28) if args.arch == "small_cnn" else (3, 32, 32)))
    eps = args.eps if args.eps is not None else (8 / 255 if args.norm == "linf" else 0.5)
    step_size = args.step_size if args.step_size is not None else eps / 4
    torch.manual_seed(args.seed)
    if args.ckpt:
        model = load_classifier(args.ckpt, map_location=device)
        threat = model.record.get("threat") or {}
        eps = args.eps if args.eps is not None else float(threat.get("eps", eps))
        step_size = args.step_size if args.step_size is not None else float(threat.get("step_size", eps / 4))
        x, y = _test_images(args.data, args.batch)
        x, y = x.to(device), y.to(device)
        shape = tuple(x.shape[1:])
    else:
        model = create_model(args.arch, 10, shape, [0.5] * shape[0], [0.5] * shape[0]).to(device).eval()
        x = torch.rand((args.batch, *shape), device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
    if args.alpha is not None:
        from mixrobust.mixing import MixedClassifier

        if args.ckpt and not args.g:
            raise SystemExit("--alpha with --ckpt needs --g (g's checkpoint)")
        g = (load_classifier(args.g, map_location=device) if args.ckpt else
             create_model(args.arch, 10, shape, [0.5] * shape[0], [0.5] * shape[0]).to(device).eval())
        model = MixedClassifier(g, model, args.alpha).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    ours = PGD(args.norm, eps=eps, step_size=step_size, steps=args.steps,
               autocast_dtype="bfloat16" if args.bf16 else None, early_exit=args.early_exit)
    ref_cls = torchattacks.PGD if args.norm == "linf" else torchattacks.PGDL2
    def make_ref(steps: int):
        return ref_cls(model, eps=eps, alpha=step_size, steps=steps, random_start=False)

    ref = make_ref(args.steps)
    exits = args.early_exit and not args.bf16  # early exit is float32-only: under autocast PGD runs the full search
    runs = {"mixrobust PGD" + (" (bf16)" if args.bf16 else "") + (" early exit" if exits else ""):
            lambda: ours(model, x, y),
            f"torchattacks {ref_cls.__name__}": lambda: ref(x, y)}

    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, torch.Tensor] = {}
    names = list(runs)
    for i in range(args.warmup + args.repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds, outputs[name] = _timed(runs[name], device)
            if i >= args.warmup:
                times[name].append(seconds)

    what = args.ckpt or args.arch
    what = what if args.alpha is None else f"mixture alpha={args.alpha:g} of {args.g or args.arch} and {what}"
    print(f"{what} {shape} on {device} ({torch.get_num_threads()} CPU threads), batch {args.batch}, "
          f"{args.norm} eps {eps:.4g}, step {step_size:.4g}, {args.steps} steps, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"clean accuracy on the {'test' if args.ckpt else 'random'} batch: {_accuracy(model, x, y):.1f}%")
    print(f"{'attack':<28} {'median s':>9} {'images/s':>10} {'attacked acc %':>15}")
    throughput = {}
    for name in names:
        median = statistics.median(times[name])
        throughput[name] = args.batch / median
        print(f"{name:<28} {median:>9.4f} {throughput[name]:>10.1f} {_accuracy(model, outputs[name], y):>15.1f}")
    print(f"throughput ratio mixrobust / torchattacks: {throughput[names[0]] / throughput[names[1]]:.2f}")
    visited = _visited_accuracy(model, make_ref, x, y, args.steps)
    ours_acc = _accuracy(model, outputs[names[0]], y)
    print(f"torchattacks {ref_cls.__name__}, broken at any visited point (ours' rule): {visited:.1f}% "
          f"(ours {ours_acc:.1f}%, difference {ours_acc - visited:+.1f} points)")


if __name__ == "__main__":
    main()
