"""Bad input through both command lines, as a user would type it: each case runs train.py or evaluate.py
in a subprocess and must exit non-zero, print no traceback, print one error message that names the
offending config key or file, and write no results file. Multirun grids must fail before their first
job runs. Each case runs in its own process, forked from a server that imported the libraries once (a fresh
interpreter spends about 6 s importing them); a few run in a fresh interpreter too.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mixrobust.checkpoint import make_record
from mixrobust.models import create_model
from mixrobust.pipelines import train
from mixrobust.training.objectives import Standard
from tests.conftest import compose_config, real_data_root

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none", "val_attack_steps=1",
        "test_attack_steps=1"]
#: Files any finished (or half-finished) run would leave: none may appear after a refused one.
RESULTS = ("results.csv", "results.json", "outcomes.npz", "run.json", "metrics.json", "certify.csv",
           "certify_summary.json", "certified_accuracy.csv", "checkpoints", "report")


@dataclass(frozen=True)
class Case:
    script: str  # train.py | evaluate.py
    args: tuple[str, ...]
    names: str  # regex the one error message must match (the key or the file)
    multirun: bool = False


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Trained digits models (g standard, h PGD-AT, rs Gaussian noise) and bad files of every kind."""
    data_root = real_data_root()
    root = tmp_path_factory.mktemp("bad_input")
    out = {}
    for name, overrides in (("g", []), ("h", ["objective=pgd_at", "objective.steps=1"]),
                            ("rs", ["objective=gaussian_noise", "objective.sigma=0.25"])):
        out[name] = str(train.run(compose_config("train", [*FAST, *overrides], root / name)).best_checkpoint)
    good = Path(out["g"]).read_bytes()
    noise = random.Random(0).randbytes(4096)
    # random.ckpt starts like a pickle of an unknown protocol (0x80 0xb2), as 1 in 256 random files do
    bad = {"empty.ckpt": b"", "random.ckpt": b"\x80\xb2" + noise, "truncated.ckpt": good[: len(good) // 2]}
    for name, data in bad.items():
        (root / name).write_bytes(data)
        out[name] = str(root / name)
    torch.save({"mixrobust": _Evil(), "state_dict": {}}, root / "evil.ckpt")
    torch.save({"mixrobust": ["not", "a", "record"], "state_dict": {}}, root / "list_record.ckpt")
    (root / "folder.ckpt").mkdir()
    mnist = create_model("small_cnn", 10, (1, 28, 28), (0.13,), (0.31,))  # valid, but for 28x28 images
    record = make_record(mnist, Standard(), None, "mnist")
    torch.save({"mixrobust": record, "state_dict": {f"model.{k}": v for k, v in mnist.state_dict().items()}},
               root / "mnist_shape.ckpt")
    for name, source in (("nan_g.ckpt", "g"), ("nan_rs.ckpt", "rs")):  # every float weight NaN, as after divergence
        ckpt = torch.load(out[source], weights_only=True)
        ckpt["state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() and ".normalize." not in k
                              else v for k, v in ckpt["state_dict"].items()}  # the normalization is the record's
        torch.save(ckpt, root / name)
    for name in ("evil.ckpt", "list_record.ckpt", "folder.ckpt", "mnist_shape.ckpt", "nan_g.ckpt", "nan_rs.ckpt"):
        out[name] = str(root / name)
    corrupt = root / "corrupt_data"
    shutil.copytree(data_root / "MNIST", corrupt / "MNIST")
    labels = corrupt / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:5000])  # the test split's labels, truncated
    out["corrupt_data"] = str(corrupt)
    return out


def cases(f: dict) -> list[Case]:
    gh = (f"g_ckpt={f['g']}", f"h_ckpt={f['h']}")
    ev = lambda *a, names: Case("evaluate.py", (*gh, *a), names)  # noqa: E731
    cert = lambda *a, names: Case("evaluate.py", (f"g_ckpt={f['g']}", f"h_ckpt={f['rs']}", "task=certify", *a),
                                  names)  # noqa: E731
    tr = lambda *a, names: Case("train.py", (*FAST, *a), names)  # noqa: E731
    return [
        # checkpoints
        Case("evaluate.py", (f"h_ckpt={f['h']}",), r"^missing config value g_ckpt; set it on the command line"),
        ev("h_ckpt=/nonexistent/best.ckpt", names=r"h_ckpt.*/nonexistent/best\.ckpt"),
        ev(f"h_ckpt={f['folder.ckpt']}", names=r"h_ckpt.*folder\.ckpt.*directory"),
        ev(f"h_ckpt={f['empty.ckpt']}", names=r"h_ckpt.*empty\.ckpt.*empty"),
        ev(f"h_ckpt={f['random.ckpt']}", names=r"h_ckpt.*random\.ckpt"),
        ev(f"h_ckpt={f['truncated.ckpt']}", names=r"h_ckpt.*truncated\.ckpt"),
        ev(f"h_ckpt={f['evil.ckpt']}", names=r"h_ckpt.*evil\.ckpt.*not plain data"),
        ev(f"h_ckpt={f['list_record.ckpt']}", names=r"h_ckpt.*list_record\.ckpt"),
        ev(f"h_ckpt={f['mnist_shape.ckpt']}", names=r"g_ckpt takes inputs of shape \(1, 8, 8\) but h_ckpt takes \(1, 28, 28\)"),
        # models whose outputs are NaN: stopped, never scored
        Case("evaluate.py", (f"g_ckpt={f['nan_g.ckpt']}", f"h_ckpt={f['h']}"), r"^g returned NaN or inf outputs on 360 of 360"),
        Case("evaluate.py", (f"g_ckpt={f['g']}", f"h_ckpt={f['nan_g.ckpt']}"), r"^h returned NaN or inf outputs on 360 of 360"),
        Case("evaluate.py", (f"g_ckpt={f['g']}", f"h_ckpt={f['nan_rs.ckpt']}", "task=certify"),
             r"^h_ckpt \(its clean pass\) returned NaN or inf outputs on 360 of 360"),
        Case("evaluate.py", (f"g_ckpt={f['nan_g.ckpt']}", f"h_ckpt={f['rs']}", "task=certify"),
             r"^g_ckpt \(its clean pass\) returned NaN or inf outputs on 360 of 360"),
        Case("evaluate.py", (f"g_ckpt={f['g']}", f"h_ckpt={f['rs']}", "task=certify",
                             f"certify.baseline_ckpt={f['nan_rs.ckpt']}"),
             r"^certify\.baseline_ckpt \(its clean pass\) returned NaN or inf outputs on 360 of 360"),
        # mixing
        ev("mix.alphas=[1.5]", names=r"mix\.alphas.*1\.5"),
        ev("mix.alphas=[]", names=r"mix\.alphas"),
        ev("mix.alphas=abc", names=r"mix\.alphas.*abc"),
        ev("mix.gammas=[1.0]", names=r"mix\.alphas.*mix\.gammas"),
        ev("mix.alphas=null", "mix.gammas=[-1.0]", names=r"mix\.gammas.*-1"),
        ev("mix.r_options=[foo]", names=r"mix\.r_options.*foo"),
        ev("mix.mix_spaces=[bar]", names=r"mix\.mix_spaces.*bar"),
        ev("mix.detach_r=maybe", names=r"mix\.detach_r.*maybe"),
        # attacks and threat
        ev("attacks=[foo]", names=r"attacks.*foo"),
        ev("attacks=[]", names=r"^attacks must hold at least 1 value"),
        ev("threat.eps=abc", names=r"threat\.eps.*abc"),
        ev("threat.eps=-0.1", names=r"threat\.eps.*-0\.1"),
        ev("threat.eps=2", names=r"threat\.eps=2.*input range"),
        ev("threat.norm=l3", names=r"threat\.norm.*l3"),
        ev("attack.steps=0", names=r"attack\.steps"),
        ev("attack.loss=hinge", names=r"^unknown attack\.loss .hinge."),
        ev("attack.restarts=2", names=r"^attack\.restarts=2 needs attack\.random_start=true"),
        ev("attacks=[mix,autoattack]", "autoattack.implementation=foolbox", names=r"autoattack\.implementation.*foolbox"),
        # images, device, processes
        ev("n=0", names=r"\bn must be a whole number >= 1"),
        ev("n=1.5", names=r"\bn must be a whole number"),
        ev("n=abc", names=r"\bn must be a whole number.*abc"),
        ev("n_per_class=-1", names=r"n_per_class.*-1"),
        ev("n=5", "n_per_class=2", names=r"n=5.*n_per_class=2"),
        ev("n=100000", names=r"n=100000.*360"),
        ev("split=tes", names=r"split.*tes"),
        ev("batch_size=0", names=r"batch_size.*0"),
        ev("device=cuda", names=r"device=cuda.*no CUDA GPU"),
        ev("device=tpu9", names=r"device.*tpu9"),
        ev("distributed.devices=0", names=r"distributed\.devices"),
        ev("cache.enabled=maybe", names=r"cache\.enabled.*maybe"),
        ev("task=bogus", names=r"task.*bogus"),
        ev("debug=yes", names=r"^debug must be true or false, got 'yes'"),
        ev("data=mnist", "data_root=/nonexistent/data", names=r"/nonexistent/data"),
        ev("data=nosuch", names=r"Could not find 'data/nosuch'"),
        ev("mix.alphs=[0.5]", names=r"mix\.alphs"),
        # certification
        cert("certify.n0=200", "certify.n=100", names=r"certify\.n0.*certify\.n"),
        cert("certify.failure_prob=1.5", names=r"certify\.failure_prob.*1\.5"),
        cert("certify.report_radii=[-0.5]", names=r"certify\.report_radii.*-0\.5"),
        cert("certify.alphas=[1.2]", names=r"certify\.alphas.*1\.2"),
        cert("certify.votes=median", names=r"certify\.votes.*median"),
        Case("evaluate.py", (*gh, "task=certify"), r"h_ckpt.*sigma.*certify\.sigma"),
        # report
        Case("evaluate.py", ("task=report",), r"report\.dir"),
        Case("evaluate.py", ("task=report", "report.dir=/nonexistent/sweep"), r"report\.dir=/nonexistent/sweep"),
        # training
        tr("trainer.max_epochs=0", names=r"trainer\.max_epochs.*0"),
        tr("trainer.max_epochs=abc", names=r"trainer\.max_epochs.*abc"),
        tr("trainer.precision=17", names=r"^unknown trainer\.precision 17; valid values: .*bf16-mixed"),
        tr("trainer=gpu", names=r"trainer\.accelerator=gpu.*no CUDA GPU"),
        tr("optimizer.lr=-1", names=r"optimizer\.lr must be > 0, got -1"),
        tr("optimizer.name=adam", names=r"optimizer\.name.*adam"),
        tr("objective=pgd_at", "objective.steps=0", names=r"objective\.steps"),
        tr("objective=gaussian_noise", "objective.sigma=0", names=r"objective\.sigma"),
        tr("threat.eps=5", names=r"threat\.eps=5.*input range"),
        tr("seed=-1", names=r"seed.*-1"),
        tr("val_attack_steps=0", names=r"val_attack_steps"),
        tr("data.batch_size=0", names=r"data\.batch_size"),
        tr("model.arch=nosuch", names=r"unknown model 'nosuch'; registered models: .*small_cnn"),
        tr("data=mnist", "data_root=/nonexistent/data", names=r"/nonexistent/data"),
        tr("data=mnist", f"data_root={f['corrupt_data']}", names=r"t10k-labels-idx1-ubyte"),
        tr("ckpt_path=/nonexistent/last.ckpt", names=r"/nonexistent/last\.ckpt"),
        tr(f"ckpt_path={f['random.ckpt']}", names=r"random\.ckpt"),
        tr(f"ckpt_path={f['h']}", names=r"ckpt_path.*objective 'pgd_at'"),
        # grids: refused before the first job runs
        Case("evaluate.py", (*gh, "mix.alphas=[0.2],[1.5]"), r"job 1 of 2.*mix\.alphas.*1\.5", multirun=True),
        Case("evaluate.py", (f"g_ckpt={f['g']}", f"h_ckpt={f['h']},/nonexistent/h.ckpt"), r"job 1 of 2.*h_ckpt",
             multirun=True),
        Case("train.py", (*FAST[1:], "trainer.max_epochs=1,0"), r"job 1 of 2.*trainer\.max_epochs", multirun=True),
    ]


def _cli(script: str, args: list[str], cwd: str, stdout: str, stderr: str, env: dict) -> None:
    """Child process: run `script` as ``python script args...`` would (its ``__main__``), output to files."""
    import runpy
    import traceback

    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    sys.argv = [script, *args]
    torch.set_num_threads(1)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:  # as the interpreter handles it at the top level
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter prints for an uncaught error
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def _argv(case: Case, out: Path) -> list[str]:
    hydra_dir = f"hydra.sweep.dir={out}" if case.multirun else f"hydra.run.dir={out}"
    return [*(["-m"] if case.multirun else []), *case.args, hydra_dir, "logger=none"]


def _run_forked(ctx, case: Case, out: Path, env: dict | None = None) -> Outcome:
    """The case in a process forked from a server that imported the entry points' libraries once."""
    folder = out.parent
    proc = ctx.Process(target=_cli, args=(str(ROOT / case.script), _argv(case, out), str(folder),
                                          str(folder / "stdout"), str(folder / "stderr"), env or {}))
    proc.start()
    proc.join(300)
    return Outcome(proc.exitcode, (folder / "stdout").read_text(), (folder / "stderr").read_text())


def _run_cold(case: Case, out: Path) -> Outcome:
    """The case exactly as a user runs it: a fresh interpreter on the entry point."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, str(ROOT / case.script), *_argv(case, out)], cwd=out.parent,
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300,
                          stdin=subprocess.DEVNULL)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def _message(stderr: str) -> str:
    """The error a user reads: Hydra's job header and its hint about HYDRA_FULL_ERROR left out."""
    skip = ("Error executing job with overrides", "Set the environment variable HYDRA_FULL_ERROR")
    return "\n".join(line for line in stderr.splitlines() if line.strip() and not line.startswith(skip))


def _written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name in RESULTS) if folder.exists() else []


def _problems(case: Case, out: Path, got: Outcome) -> list[str]:
    message, problems = _message(got.stderr), []
    if got.returncode == 0:
        problems.append("exit code 0")
    if "Traceback" in got.stdout + got.stderr:
        problems.append("a traceback")
    if not message:
        problems.append("no error message")
    elif not re.search(case.names, message.splitlines()[0]):
        problems.append(f"the message does not match {case.names!r}")
    if re.search(r"Warning:", message) or got.stderr.count("Error executing job") > 1:
        problems.append("more than one message")
    if _written(out):
        problems.append(f"results written: {_written(out)}")
    if (out.parent / "pwned-by-checkpoint").exists():
        problems.append("the checkpoint's pickled code ran")
    return problems


#: Cases that also run in a fresh interpreter (every other case runs in a forked process: same entry
#: point, same argv, its imports already done), one per kind of failure path.
COLD = ("h_ckpt=/nonexistent/best.ckpt", "mix.alphas=[0.2],[1.5]", "trainer.max_epochs=0", "data=nosuch")


@pytest.fixture(scope="module")
def server():
    """Processes forked from a server that imported the entry points' libraries once."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mixrobust.pipelines.train", "mixrobust.pipelines.mix", "mixrobust.pipelines.certify",
                                "hydra._internal.utils", __name__])
    return ctx


def test_every_bad_input_gives_one_clean_message(files, server, tmp_path):
    """Every case in a forked process, those of `COLD` in a fresh interpreter too; two at a time (each is one
    process doing little but Python)."""
    from concurrent.futures import ThreadPoolExecutor

    all_cases = cases(files)
    assert len({(c.script, c.args) for c in all_cases}) == len(all_cases) >= 40
    runs = [(i, case, kind) for i, case in enumerate(all_cases)
            for kind in ("forked", *(("fresh",) if set(case.args) & set(COLD) else ()))]
    assert sum(kind == "fresh" for *_, kind in runs) == len(COLD)

    def failure(run) -> str | None:
        i, case, kind = run
        out = tmp_path / f"case{i:02d}-{kind}" / "run"
        out.parent.mkdir()
        got = _run_forked(server, case, out) if kind == "forked" else _run_cold(case, out)
        problems = _problems(case, out, got)
        return (f"[{kind}] {case.script} {' '.join(case.args)}: {', '.join(problems)}\n    "
                + "\n    ".join(got.stderr.strip().splitlines()[-6:])) if problems else None

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(failure, runs) if f]
    assert not failures, f"{len(failures)} bad inputs misbehaved:\n" + "\n".join(failures)


@pytest.mark.parametrize("debug", [("debug=true",), ("HYDRA_FULL_ERROR=1",)])
def test_debug_and_hydra_full_error_show_the_traceback(files, server, tmp_path, debug):
    flag = {"HYDRA_FULL_ERROR": "1"} if debug[0].startswith("HYDRA") else {}
    args = (f"g_ckpt={files['g']}", f"h_ckpt={files['h']}", "mix.alphas=[1.5]", *([] if flag else debug))
    out = tmp_path / "run"
    out.parent.mkdir(exist_ok=True)
    got = _run_forked(server, Case("evaluate.py", args, ""), out, env=flag)
    assert got.returncode != 0 and not _written(out)
    assert "Traceback" in got.stderr and "mix.alphas[0] must be a number >= 0 and <= 1, got 1.5" in got.stderr
