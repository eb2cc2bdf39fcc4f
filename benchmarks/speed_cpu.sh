#!/usr/bin/env bash
# CPU speed measurements for docs/RESULTS.md (issue 10 items 2 and 5). Run it on a QUIET machine
# (nothing else running: the figures are only as good as the quiet); it takes about 30-60 minutes
# on 2 cores and (re)writes benchmarks/results/speed_cpu.json:
#   1. ResNet-18 composites (two ResNet-18 + mixer V3, random weights) at widths 8, 16, 32, 64:
#      attack steps at batch 128, fp32 NCHW eager vs bf16 + channels_last, interleaved (--compare);
#   2. the published CIFAR-10 architecture (BiT-M-R152x2 at 128 px + WRN-70-16 + mixer V4, random
#      weights) at a batch size a CPU holds, the same comparison;
#   3. the demo evaluation (run.py --eval, 64 images) alone and beside one busy process (a Python
#      loop; another torch job), with the package's thread policy (threads = cores, idle OpenMP
#      threads sleep), with spinning OpenMP threads, and with one thread.
#
#   bash benchmarks/speed_cpu.sh                  # everything
#   SMOKE=1 OUT=/tmp/s.json bash benchmarks/speed_cpu.sh   # tiny sizes, to check it runs
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/speed_cpu.json}
WIDTHS=${WIDTHS:-8 16 32 64}
BATCH=${BATCH:-128}
ITERS=${ITERS:-5}
ROUNDS=${ROUNDS:-3}
PUBLISHED_BATCH=${PUBLISHED_BATCH:-8}
PUBLISHED_ITERS=${PUBLISHED_ITERS:-2}
DATA=${DATA:-../shared/data/cifar10}
DEMO_N=${DEMO_N:-64}
REPEATS=${REPEATS:-2}
PUBLISHED=${PUBLISHED:-1}
if [ "${SMOKE:-0}" = 1 ]; then
  WIDTHS=8 BATCH=2 ITERS=1 ROUNDS=1 DEMO_N=2 REPEATS=1 PUBLISHED=0
fi
# The thread count and OpenMP policy are the package's defaults (scripts call
# runtime.configure_threads), not whatever the calling shell set.
unset OMP_NUM_THREADS MKL_NUM_THREADS OMP_WAIT_POLICY
rm -f "$OUT"
mkdir -p "$(dirname "$OUT")"

for width in $WIDTHS; do
  echo "== ResNet-18 composite, width $width"
  python3 scripts/benchmark.py --config configs/rn18_cifar10.yaml \
    --set "forward_settings.std_model_kwargs={width: $width}" \
    --set "forward_settings.rob_model_kwargs={width: $width}" \
    --set forward_settings.in_planes=None \
    --mode attack --compare --precision bf16 --channels-last --batch-size "$BATCH" \
    --iters "$ITERS" --rounds "$ROUNDS" --json "$OUT" --label "resnet18_w${width}_b${BATCH}"
done

if [ "$PUBLISHED" = 1 ]; then
  echo "== published CIFAR-10 architecture, batch $PUBLISHED_BATCH"
  python3 scripts/benchmark.py --config configs/cifar10_edm.yaml --set log_dir=/nonexistent \
    --mode attack --compare --precision bf16 --channels-last --batch-size "$PUBLISHED_BATCH" \
    --iters "$PUBLISHED_ITERS" --rounds "$ROUNDS" --warmup 1 --json "$OUT" \
    --label "cifar10_edm_published_b${PUBLISHED_BATCH}"
fi

echo "== run.py --eval (demo, $DEMO_N images) alone and beside a busy process"
DEMO_OUT=$(mktemp -d)
python3 scripts/benchmark_busy.py --json "$OUT" --label "demo_eval_n${DEMO_N}_beside_busy" \
  --repeats "$REPEATS" -- \
  bash -c "rm -rf '$DEMO_OUT/demo' && exec python3 run.py --eval --config configs/demo.yaml \
    --data-dir '$DATA' --n-examples $DEMO_N --output-dir '$DEMO_OUT/demo' --log-level WARNING"
rm -rf "$DEMO_OUT"
echo "written: $OUT"
