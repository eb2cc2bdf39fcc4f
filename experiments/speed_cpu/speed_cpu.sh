#!/usr/bin/env bash
# CPU speed measurements for docs/RESULTS.md (issue 10 items 2 and 5). Run it on a QUIET machine
# (nothing else running: the figures are only as good as the quiet); it takes roughly 30-60
# minutes on 2 cores and (re)writes experiments/speed_cpu/speed_cpu.json:
#   1. ResNet-18 composites (two ResNet-18 + mixer V3, random weights) at widths 8, 16, 32, 64:
#      attack steps at batch 128, fp32 NCHW eager vs the fast path (bf16 + channels_last where the
#      CPU has native bf16, else fp32 + channels_last; FAST_PRECISION=bf16|fp32 chooses),
#      interleaved (--compare);
#   2. the published CIFAR-10 architecture (BiT-M-R152x2 at 128 px + WRN-70-16 + mixer V4, random
#      weights) at a batch size a CPU holds, the same comparison;
#   3. the demo evaluation (run.py --eval, 64 images) alone and beside one busy process (a Python
#      loop; another torch job), with the package's thread policy (threads = cores, idle OpenMP
#      threads sleep), with spinning OpenMP threads, and with one thread.
#
#   bash experiments/speed_cpu/speed_cpu.sh                  # everything
#   SMOKE=1 OUT=/tmp/s.json bash experiments/speed_cpu/speed_cpu.sh   # tiny sizes, to check it runs
# Knobs (environment): WIDTHS, BATCH, ITERS, ROUNDS, FAST_PRECISION, PUBLISHED (0: skip),
# PUBLISHED_BATCH, PUBLISHED_ITERS, BUSY (0: skip part 3), DEMO_N, REPEATS, DATA, OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."  # python3 -m adaptive_smoothing.X runs from here, installed or not

OUT=${OUT:-experiments/speed_cpu/speed_cpu.json}
WIDTHS=${WIDTHS:-8 16 32 64}
BATCH=${BATCH:-128}
ITERS=${ITERS:-5}
ROUNDS=${ROUNDS:-3}
PUBLISHED_BATCH=${PUBLISHED_BATCH:-4}   # peak RSS 8.3 GiB at batch 1 (both copies)
PUBLISHED_ITERS=${PUBLISHED_ITERS:-2}
DATA=${DATA:-../shared/data/cifar10}
DEMO_N=${DEMO_N:-64}
REPEATS=${REPEATS:-2}
PUBLISHED=${PUBLISHED:-1}
BUSY=${BUSY:-1}
if [ "${SMOKE:-0}" = 1 ]; then
  WIDTHS=8 BATCH=2 ITERS=1 ROUNDS=1 DEMO_N=2 REPEATS=1 PUBLISHED=0
fi
# The thread count and OpenMP policy are the package's defaults (scripts call
# runtime.configure_threads), not whatever the calling shell set.
unset OMP_NUM_THREADS MKL_NUM_THREADS OMP_WAIT_POLICY
# The fast path: bf16 + channels_last where the CPU has native bf16 (avx512_bf16/AMX); elsewhere
# bf16 is emulated (about 10x slower than fp32), so fp32 + channels_last is the fast path there
# and one bf16 run at width 8 records the emulation's cost.
NATIVE_BF16=$(python3 -c "import torch; from adaptive_smoothing.runtime import native_bf16; \
print(int(native_bf16(torch.device('cpu'))))")
if [ "${FAST_PRECISION:-auto}" = auto ]; then
  FAST_PRECISION=$([ "$NATIVE_BF16" = 1 ] && echo bf16 || echo fp32)
fi
echo "native bf16: $NATIVE_BF16; fast path: $FAST_PRECISION + channels_last"
rm -f "$OUT"
mkdir -p "$(dirname "$OUT")"

for width in $WIDTHS; do
  echo "== ResNet-18 composite, width $width"
  python3 -m adaptive_smoothing.tools.cli.benchmark --config configs/rn18_cifar10.yaml \
    --set "forward_settings.std_model_kwargs={width: $width}" \
    --set "forward_settings.rob_model_kwargs={width: $width}" \
    --set forward_settings.in_planes=None \
    --mode attack --compare --precision "$FAST_PRECISION" --channels-last --batch-size "$BATCH" \
    --iters "$ITERS" --rounds "$ROUNDS" --json "$OUT" \
    --label "resnet18_w${width}_b${BATCH}_${FAST_PRECISION}"
done
if [ "$FAST_PRECISION" != bf16 ]; then
  echo "== ResNet-18 composite, width 8, emulated bf16"
  python3 -m adaptive_smoothing.tools.cli.benchmark --config configs/rn18_cifar10.yaml \
    --set "forward_settings.std_model_kwargs={width: 8}" \
    --set "forward_settings.rob_model_kwargs={width: 8}" --set forward_settings.in_planes=None \
    --mode attack --compare --precision bf16 --channels-last --batch-size "$BATCH" \
    --iters "$ITERS" --rounds "$ROUNDS" --json "$OUT" --label "resnet18_w8_b${BATCH}_bf16_emulated"
fi

if [ "$PUBLISHED" = 1 ]; then
  echo "== published CIFAR-10 architecture, batch $PUBLISHED_BATCH"
  python3 -m adaptive_smoothing.tools.cli.benchmark --config configs/cifar10_edm.yaml \
    --set log_dir=/nonexistent \
    --mode attack --compare --precision "$FAST_PRECISION" --channels-last \
    --batch-size "$PUBLISHED_BATCH" \
    --iters "$PUBLISHED_ITERS" --rounds "$ROUNDS" --warmup 1 --json "$OUT" \
    --label "cifar10_edm_published_b${PUBLISHED_BATCH}_${FAST_PRECISION}"
fi

if [ "$BUSY" = 1 ]; then
echo "== run.py --eval (demo, $DEMO_N images) alone and beside a busy process"
DEMO_OUT=$(mktemp -d)
python3 -m adaptive_smoothing.tools.cli.benchmark_busy --json "$OUT" \
  --label "demo_eval_n${DEMO_N}_beside_busy" \
  --repeats "$REPEATS" -- \
  bash -c "rm -rf '$DEMO_OUT/demo' && exec python3 run.py --eval --config configs/demo.yaml \
    --data-dir '$DATA' --n-examples $DEMO_N --output-dir '$DEMO_OUT/demo' --log-level WARNING"
rm -rf "$DEMO_OUT"
fi
echo "written: $OUT"
