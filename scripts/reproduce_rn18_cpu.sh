#!/usr/bin/env bash
# The small-scale CIFAR-10 reproduction of docs/RESULTS.md, on CPU, from the offline data copy:
# train a standard and an FGSM-RS adversarially trained ResNet-18 (width 8) on 25k images, train
# the mixing network, then evaluate STD, ROB, fixed-alpha mixtures and the adaptive composite on
# the same 1000 test images (APGD-CE + APGD-T, 20 iterations, Linf 8/255) and plot.
# Every step resumes where it stopped when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."  # python3 -m adaptive_smoothing.cli.X runs from here, installed or not
DATA=${DATA:-../shared/data/cifar10}
RUNS=runs/rn18
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

python3 -m adaptive_smoothing.cli.train_base --arch resnet18 --arch-kwargs '{"width": 8}' \
  --data-format npz --data-dir "$DATA" --n-train 25000 --epochs 8 --batch-size 128 --method standard \
  --output "$RUNS/std_w8.pt"
python3 -m adaptive_smoothing.cli.train_base --arch resnet18 --arch-kwargs '{"width": 8}' \
  --data-format npz --data-dir "$DATA" --n-train 25000 --epochs 8 --batch-size 128 --method fgsm \
  --output "$RUNS/rob_w8_fgsm.pt"
python3 run.py --training --config configs/rn18w8_cifar10_cpu.yaml --data-dir "$DATA"
python3 run.py --eval --config configs/rn18w8_cifar10_cpu.yaml --data-dir "$DATA" \
  --mixer-checkpoint mixer/checkpoints/last.pt --output-dir "$RUNS/sweep" --alpha-sweep 0,0.2,0.4,0.5,0.6,0.7,0.8,0.9,0.95,1 \
  --device cpu
python3 -m adaptive_smoothing.cli.plot_results "$RUNS/sweep" \
  --output-dir experiments/rn18w8_cpu \
  --title "ResNet-18 (width 8), CIFAR-10"
