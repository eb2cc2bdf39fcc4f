#!/usr/bin/env bash
# Base models for the CPU demonstration of issue 11: ResNet-18 at width 16 (1/4 of the channels),
# CIFAR-10 (the offline copy), one thread each, niced so that other work keeps the cores.
# Resumable: rerun the same line and it continues the file from its last finished epoch
# (each epoch's order depends on (seed, epoch) alone; changed settings are refused).
#   bash experiments/rn18w16_cpu/train_bases.sh std    # standard training, 30 epochs
#   bash experiments/rn18w16_cpu/train_bases.sh fgsm   # FGSM-RS (eps 8/255, step 10/255), 20 epochs
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/rn18w16_cpu
DATA=${DATA:-../shared/data/cifar10}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
COMMON=(--arch resnet18 --arch-kwargs '{"width": 16}' --data-format npz --data-dir "$DATA"
        --threads 1 --device cpu --seed 0)
case "${1:?std or fgsm}" in
  std)  exec nice -n 19 python3 -m adaptive_smoothing.cli.train_base "${COMMON[@]}" \
          --method standard --epochs 30 --output "$HERE/std.pt" ;;
  fgsm) exec nice -n 19 python3 -m adaptive_smoothing.cli.train_base "${COMMON[@]}" \
          --method fgsm --epochs 20 --output "$HERE/rob_fgsm.pt" ;;
  *) echo "usage: $0 std|fgsm" >&2; exit 2 ;;
esac
