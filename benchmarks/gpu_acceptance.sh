#!/usr/bin/env bash
# The GPU figures of the README, as one prepared run on a lent GPU machine (CUDA image with torch and
# lightning; hydra-core / omegaconf / antlr4 / torchattacks carried as wheels in .whl, CIFAR-10 .npz
# files in .gpudata/CIFAR10; digits checkpoints in outputs/digits/{g,h} for the sweep). Each step has
# its own time limit so one slow step cannot eat the rest. SECTIONS picks steps (default: all).
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
D=${DATA_ROOT:-.gpudata}
SECTIONS=${SECTIONS:-train certify sweep attacks}
on() { [[ " $SECTIONS " == *" $1 "* ]]; }
if on train; then
# issue 2: CIFAR-10 ResNet-18 training throughput through the Trainer (bf16, channels_last, batch 512)
timeout 70 python3 benchmarks/bench_train_throughput.py --data-root "$D" --objective standard --epochs 8 --warmup 2 --reference 59000 2>&1 | grep -A1 "^train throughput"
timeout 60 python3 benchmarks/bench_train_throughput.py --data-root "$D" --objective pgd_at --steps 10 --epochs 3 --warmup 1 --reference 5900 2>&1 | grep -A1 "^train throughput"
fi
if on certify; then
# issue 4: CERTIFY at n = 100,000 with a CIFAR ResNet-110, batch 4,000 (float32, then bf16 + channels_last),
# eager and through torch.compile, each next to the bare eager model passes timed in the same run
R="--arch resnet110 --input-shape 3 32 32 --device cuda --n 100000 --n0 100 --num-images 2 --batch 4000 --skip-reference --compute-only --repeats 2"
timeout 45 python3 benchmarks/bench_certify.py $R 2>&1 | tail -3
timeout 45 python3 benchmarks/bench_certify.py $R --bf16 --channels-last 2>&1 | tail -3
timeout 120 python3 benchmarks/bench_certify.py $R --compile 2>&1 | tail -3
timeout 120 python3 benchmarks/bench_certify.py $R --bf16 --channels-last --compile 2>&1 | tail -3
fi
if on sweep; then
# issue 5: the digits sweep (6 alphas x 2 R_i options) on the GPU through the local multi-GPU
# launcher (one job per visible GPU, each pinned by a lease), then resumed (every job skipped)
rm -rf multirun/gpu_digits_sweep
timeout 150 python3 evaluate.py -m experiment=digits_sweep logger=none hydra/launcher=local_gpus \
    hydra.sweep.dir=multirun/gpu_digits_sweep 2>&1 | grep -E "evaluating|sweep report|Error" | sed -n '1p;$p'
timeout 60 python3 evaluate.py -m experiment=digits_sweep logger=none hydra.sweep.dir=multirun/gpu_digits_sweep \
    2>&1 | grep -c "skipped" | sed 's/^/jobs skipped on resume: /'
head -3 multirun/gpu_digits_sweep/report/combined.csv | cut -c1-160
fi
if on attacks; then
# issue 14: PGD-20 on the mixture of two ResNet-18s (alpha 0.7) against torchattacks, float32 and with our
# forward passes in bf16; then the sweep's attacks eager vs channels_last vs compiled, at equal accuracies
P="--arch resnet18 --input-shape 3 32 32 --device cuda --batch 512 --steps 20 --alpha 0.7 --repeats 5"
timeout 60 python3 benchmarks/bench_pgd.py $P 2>&1 | tail -4
timeout 60 python3 benchmarks/bench_pgd.py $P --bf16 --channels-last 2>&1 | tail -4
timeout 240 python3 benchmarks/bench_kernels.py --arch resnet18 --input-shape 3 32 32 --n 1024 --batch 512 2>&1 | tail -8
fi
