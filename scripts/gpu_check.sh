#!/usr/bin/env bash
# The prepared device check (issue 10 item 7), for one H200 within about 8 minutes:
#   1. speed of the published CIFAR-10 composite (BiT-M-R152x2 at 128 px + WRN-70-16 + mixer V4,
#      random weights) per attack step in the authors' setting (fp32 NCHW eager, batch 50);
#   2. the same in the fast path (bf16 + channels_last) over batch sizes 128-1024;
#   3. bf16 vs fp32 APGD-CE robust accuracy on 256 points of a random-weight composite with
#      sharpened heads, labelled by its own clean predictions (must agree within 1 point), at
#      8/255 and at a calibrated radius where about half the points stay robust in fp32;
#   4. the fast path with torch.compile at one batch size (last: compiling takes the longest).
# Each check writes $OUT/<name>.json (parameters, machine, result or error, seconds) under its own
# time limit, so a failing or slow check loses only itself; $OUT/summary.json lists them all.
#
#   OUT=/path/to/out bash scripts/gpu_check.sh
#   GPU_CHECK_SMOKE=1 OUT=/tmp/gc bash scripts/gpu_check.sh   # CPU smoke test at tiny sizes
#
# To add a check: a function in adaptive_smoothing/tools/gpu_check.py (CHECKS) and a `check` line below.
set -uo pipefail
cd "$(dirname "$0")/.."  # python3 -m adaptive_smoothing.tools.cli.X runs from here, installed or not

OUT=${OUT:-outputs/gpu_check}
CONFIG=${GPU_CHECK_CONFIG:-configs/cifar10_edm.yaml}
BATCHES=${GPU_CHECK_BATCHES:-128,256,512,1024}
ITERS=${GPU_CHECK_ITERS:-5}
N=${GPU_CHECK_N:-256}
ATTACK_ITERS=${GPU_CHECK_ATTACK_ITERS:-50}
EPS=${GPU_CHECK_EPS:-auto,8/255}   # auto: where about half the points stay robust in fp32
COMPILE_BATCH=${GPU_CHECK_COMPILE_BATCH:-512}
DEVICE=${GPU_CHECK_DEVICE:-auto}
LIMIT=${GPU_CHECK_LIMIT:-1}   # multiplies every time limit
EXTRA=()
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  # Tiny sizes on any machine: ResNet-18 width 8 composites, a few images and iterations.
  CONFIG=configs/rn18w8_cifar10_cpu.yaml BATCHES=4,8 ITERS=1 N=8 ATTACK_ITERS=2 COMPILE_BATCH=4
  DEVICE=cpu
  EXTRA=(--warmup 0)
fi
mkdir -p "$OUT"
NAMES=()

check() {  # check NAME SECONDS KIND [options...]
  local name=$1 seconds=$2 kind=$3
  shift 3
  NAMES+=("$name")
  echo "== $name (limit $((seconds * LIMIT)) s)"
  timeout --signal=INT --kill-after=20 "$((seconds * LIMIT))" \
    python3 -m adaptive_smoothing.tools.cli.gpu_check "$kind" --name "$name" --out "$OUT" \
    --config "$CONFIG" \
    --device "$DEVICE" "${EXTRA[@]}" "$@" || echo "== $name: failed or timed out (rc $?)"
}

check speed_authors_fp32_b50 90 speed --precision fp32 --no-channels-last \
  --batch-sizes "${GPU_CHECK_AUTHORS_BATCH:-50}" --iters "$((ITERS * 2))"
check speed_bf16_channels_last 120 speed --precision bf16 --channels-last --batch-sizes "$BATCHES" \
  --iters "$ITERS"
check bf16_attack_agreement 180 bf16_attack_agreement --precision bf16 --channels-last \
  --n-examples "$N" --attack-iters "$ATTACK_ITERS" --eps "$EPS" --batch-sizes "$N"
if [ "${GPU_CHECK_SMOKE:-0}" != 1 ] || [ "${GPU_CHECK_SMOKE_COMPILE:-0}" = 1 ]; then
  # Compiling on a CPU takes minutes, so the smoke test leaves it out unless asked.
  check speed_bf16_channels_last_compile 200 speed --precision bf16 --channels-last --compile \
    --batch-sizes "$COMPILE_BATCH" --iters "$ITERS"
fi
# Further checks go here (each: check NAME SECONDS KIND [options]).

# GPU and torchrun readiness (README "GPUs and torchrun"): sync debug over APGD steps, fp32/bf16/
# fp16 APGD-CE, resumes on the device, AutoAttack cost against NCCL's timeout, determinism, device
# vs CPU evaluation; one JSON per check under $OUT/readiness/.
READY=(--out "$OUT/readiness" --device "$DEVICE")
[ "${GPU_CHECK_SMOKE:-0}" = 1 ] && READY+=(--smoke)
[ -f data/cifar10/test.npz ] && READY+=(--data-dir data/cifar10)
echo "== readiness (limit $((240 * LIMIT)) s)"
timeout --signal=INT --kill-after=20 "$((240 * LIMIT))" \
  python3 -m adaptive_smoothing.tools.cli.gpu_readiness "${READY[@]}" \
  || echo "== readiness: failed or timed out (rc $?)"

IFS=, ; python3 -m adaptive_smoothing.tools.cli.gpu_check summary --out "$OUT" --expect "${NAMES[*]}"
