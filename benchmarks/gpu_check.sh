#!/usr/bin/env bash
# Every GPU figure issues 15 and 24 ask for, in one run on a lent GPU machine (about 10 minutes on an H100/H200):
#   train-gen against the course-style reference at the course's batches (32 at 128 px, 12 at 256 px) — images/s,
#   data wait, GPU busy —, then with --compile, then with --bs auto; train-gan steps/s with and without --compile;
#   enhance tiles/s with and without --compile. Output: $OUT/gpu_check.txt (or ./gpu_check.txt).
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_check.sh
set -u
out="${OUT:-.}/gpu_check.txt"
pip install -q -e . >/dev/null 2>&1 || pip install -e .
run() { echo "\$ $*" | tee -a "$out"; timeout 900 "$@" 2>&1 | grep -v -i "warn" | tail -12 | tee -a "$out"; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$out"
run python benchmarks/bench_train.py --device cuda --n 384 --size 128 --bs 32
run python benchmarks/bench_train.py --device cuda --n 384 --size 256 --bs 12
run python benchmarks/bench_train.py --device cuda --n 384 --size 128 --bs 32 --compile --skip-reference
run python benchmarks/bench_train.py --device cuda --n 384 --size 128 --bs auto --skip-reference
run python benchmarks/bench_compile.py --device cuda --arch unet-resnet34 --loss feature --size 128 --bs 32 \
    --n 128 --gan-iters 40 --critic gan-critic --skip-gen --skip-enhance
run python benchmarks/bench_compile.py --device cuda --arch unet-resnet34 --skip-train --photo 2048 --batch 4
# issue 24: the rehearsal of the two largest recipes on this GPU (stand-ins of their datasets unless data/ holds
# them; the device machine has no internet, so the VGG / ResNet weights are random, which the lines say)
run crappify run realesrgan-x4 --rehearse --offline -o "${OUT:-.}/rehearse-realesrgan-x4" --quiet
run crappify run flickr30k-lesson7 --rehearse --offline -o "${OUT:-.}/rehearse-flickr30k-lesson7" --quiet
