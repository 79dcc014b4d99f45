"""Wall time of a Hydra alpha sweep with the shared cache against the same sweep without it.

Runs ``python evaluate.py -m experiment=<preset>`` as a user would, one variant after another,
each into its own sweep folder and (for cached variants) a fresh cache folder:

- ``nocache``: ``cache.enabled=false``: every job attacks g (STD) and h (ROB) itself;
- ``cache``: the first job computes the STD / ROB images and base outputs, the others read them;
- ``joblib`` (``--joblib``): the cached sweep through ``hydra/launcher=local_cpus`` with 2 worker
  processes.

It prints each variant's wall time, the ratio against ``nocache``, and whether every variant's
report (``report/combined.csv``, without its overrides column) holds exactly the same numbers.

    MIXROBUST_DATA_ROOT=../shared/data python benchmarks/bench_sweep_cache.py --preset mnist_sweep --joblib
    python benchmarks/bench_sweep_cache.py --preset digits_sweep
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def numbers(report: Path) -> list[tuple]:
    """The combined report's rows without the overrides column (it names the variant's options)."""
    with open(report, newline="") as f:
        return [tuple(v for k, v in row.items() if k != "overrides") for row in csv.DictReader(f)]


def run(preset: str, sweep_dir: Path, cache_dir: Path, extra: list[str]) -> float:
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "-m", f"experiment={preset}", f"hydra.sweep.dir={sweep_dir}",
           *extra]
    env = {**os.environ, "MIXROBUST_CACHE_DIR": str(cache_dir), "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits_sweep", help="a sweep preset in conf/experiment")
    ap.add_argument("--joblib", action="store_true", help="also run the cached sweep with 2 joblib workers")
    ap.add_argument("--out", default=None, help="folder for the sweeps (default: a temporary folder)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every variant")
    args = ap.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_sweep_cache-"))
    variants = [("nocache", ["cache.enabled=false"]), ("cache", [])]
    if args.joblib:
        variants.append(("joblib", ["hydra/launcher=local_cpus", "hydra.launcher.n_jobs=2"]))
    times, reports = {}, {}
    for name, extra in variants:
        sweep, cache = out / name, out / f"{name}_cache"
        for path in (sweep, cache):
            shutil.rmtree(path, ignore_errors=True)
        times[name] = run(args.preset, sweep, cache, [*extra, *args.overrides])
        reports[name] = numbers(sweep / "report" / "combined.csv")
        print(f"{name:8s}: {times[name]:8.1f} s wall  ({times['nocache'] / times[name]:.2f}x vs nocache)", flush=True)
    same = all(rows == reports["nocache"] for rows in reports.values())
    print(f"{args.preset}: {len(reports['nocache'])} result rows; identical numbers in every variant: {same}")
    print(f"sweeps in {out}")


if __name__ == "__main__":
    main()
