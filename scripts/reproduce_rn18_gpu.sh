#!/usr/bin/env bash
# The paper's small-scale CIFAR-10 setting at full width, budgeted to one ~10-minute run on one
# GPU (an H200): train a standard and an FGSM-RS adversarially trained ResNet-18 (bf16 autocast),
# train the V3 mixing network (configs/rn18_cifar10_gpu.yaml), evaluate STD, ROB, fixed-alpha
# mixtures and the adaptive composite on the same test images (APGD-CE + APGD-T, Linf 8/255), and
# plot. Every step resumes where it stopped when the script is run again.
#
# Knobs (environment variables), with their defaults:
#   DATA=data/cifar10  offline copy (train.npz/test.npz) of ../shared/data/cifar10
#   N_TRAIN=50000  EPOCHS_STD=15  EPOCHS_ROB=15  BASE_BATCH=512
#   MIXER_BATCH=256  N_EVAL=1000  AA_ITERS=100  SWEEP=0,0.2,0.5,0.7,0.8,0.9,0.95,1
#   DEVICE=auto  PLOTS=experiments/rn18_gpu  MIXER_DEBUG=0 (1: two mixer iterations only)
# A CPU smoke test of the whole script (minutes): N_TRAIN=256 EPOCHS_STD=1 EPOCHS_ROB=1
#   BASE_BATCH=64 MIXER_BATCH=8 MIXER_DEBUG=1 N_EVAL=16 AA_ITERS=2 SWEEP=0,1
#   PLOTS=/tmp/smoke_plots DATA=../shared/data/cifar10 bash scripts/reproduce_rn18_gpu.sh
# On a lent device machine (see the device tool's README): copy ../shared/data/cifar10 to
# data/cifar10 (ignored by git; 54 MB) and carry it, plus wheels for what its image lacks
# (pyautoattack, repacked without its 45 MB of example models, and pytorch_warmup).
set -euo pipefail
cd "$(dirname "$0")/.."  # python3 -m adaptive_smoothing.cli.X runs from here, installed or not
DATA=${DATA:-data/cifar10}
RUNS=runs/rn18_gpu  # the config's log_dir
DEVICE=${DEVICE:-auto}
BASE=(--arch resnet18 --data-format npz --data-dir "$DATA" --n-train "${N_TRAIN:-50000}"
      --batch-size "${BASE_BATCH:-512}" --device "$DEVICE")
CONFIG=(--config configs/rn18_cifar10_gpu.yaml --data-dir "$DATA")
mkdir -p "$RUNS"
SECONDS=0
python3 -m adaptive_smoothing.cli.train_base "${BASE[@]}" --epochs "${EPOCHS_STD:-15}" \
  --method standard \
  --output "$RUNS/std.pt"
echo "STD trained: ${SECONDS} s"
python3 -m adaptive_smoothing.cli.train_base "${BASE[@]}" --epochs "${EPOCHS_ROB:-15}" \
  --method fgsm \
  --output "$RUNS/rob_fgsm.pt"
echo "ROB trained: ${SECONDS} s"
DEBUG=()
MIXER=mixer/checkpoints/last.pt  # relative to the config's log_dir
if [[ "${MIXER_DEBUG:-0}" == 1 ]]; then DEBUG=(--debug); MIXER=mixer/debug/checkpoints/last.pt; fi
python3 run.py --training "${CONFIG[@]}" --batch-size "${MIXER_BATCH:-256}" --device "$DEVICE" "${DEBUG[@]}"
echo "mixer trained: ${SECONDS} s"
python3 run.py --eval "${CONFIG[@]}" --mixer-checkpoint "$MIXER" \
  --output-dir "$RUNS/sweep" --n-examples "${N_EVAL:-1000}" --device "$DEVICE" \
  --autoattack-iterations "${AA_ITERS:-100}" --alpha-sweep "${SWEEP:-0,0.2,0.5,0.7,0.8,0.9,0.95,1}"
echo "evaluated: ${SECONDS} s"
python3 -m adaptive_smoothing.cli.plot_results "$RUNS/sweep" \
  --output-dir "${PLOTS:-experiments/rn18_gpu}" \
  --title "ResNet-18, CIFAR-10 (GPU schedule)"
