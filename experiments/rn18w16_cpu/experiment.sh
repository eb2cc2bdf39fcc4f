#!/usr/bin/env bash
# The CPU demonstration of issue 11, part 5 (docs/RESULTS.md): mixer trainings on the width-16
# ResNet-18 bases of this folder and their alpha sweeps. Every step is resumable: rerun the same
# line after an interruption and it continues (trainings from their last checkpoint, evaluations
# from their finished batches, pre-attacking from its finished blocks). One thread per step, niced,
# so two steps can share the 2 cores (e.g. a training beside `fixed`).
#   experiment.sh clean            # clean accuracy of STD and ROB on all 10,000 test images
#   experiment.sh fixed            # the fixed-alpha mixtures on the first 1,000 test images
#   experiment.sh pre-attack       # pre-attacked blocks for the pa recipe (runs/rn18w16/pa.pt)
#   experiment.sh train online|pa  # a mixer training (the online / pre-attacked recipe)
#   experiment.sh train nonadaptive # the online recipe without the attack's mixer term (w = 0)
#   experiment.sh curves RECIPE    # that training's held-out validation curves (AUCs) -> $HERE/RECIPE/
#   experiment.sh sweep RECIPE     # that mixer's sweep: the fixed mixtures (reused) + composite
#   experiment.sh calibrate        # the nonlinear composite's constants, on test images 5000..6999
#                                  # -> $HERE/nonlinear/calibration/, configs/rn18w16_nonlinear_cpu.yaml
#   experiment.sh nonlinear        # its sweep: fixed mixtures (reused) + nonlinear + matched alpha
#   experiment.sh gate NAME        # the sweep of the rob_logits gate trained in rob_logits_pilots/NAME
#                                  # (GATE_CONFIG, default configs/rn18w16_rob_logits_raw_cpu.yaml;
#                                  # GATE_SET: extra --set arguments): fixed mixtures (reused) + the
#                                  # gate composite (AutoAttack, adaptive, transfer, Square) + matched alpha
# Settings: configs/rn18w16_cifar10_cpu.yaml. Evaluations: APGD-CE + APGD-T (9 targets) of
# pyautoattack, 100 iterations, Linf 8/255; the composite also gets the adaptive attack.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/rn18w16_cpu
CONFIG=configs/rn18w16_cifar10_cpu.yaml
RUNS=${RUNS:-runs/rn18w16}       # trainings and pre-attacked data (large; not committed)
EVAL=${EVAL:-$HERE/eval}          # evaluations (small; committed, so they resume anywhere)
DATA=${DATA:-../shared/data/cifar10}
ALPHAS=${ALPHAS:-0,0.2,0.5,0.72,0.8,0.9,0.95,1}  # 0.72: the composites' mean alpha; finished points are reused
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
RUN=(nice -n 19 python3 run.py --config "$CONFIG" --data-dir "$DATA" --threads 1 --device cpu)
PA=(--set "dataset_settings.pa_path=$RUNS/pa.pt" --set dataset_settings.gamma_0=7.1
    --set dataset_settings.blocks=8)
# NPROC=2: two CPU processes (torchrun over gloo) share an evaluation's batches, one thread each.
LAUNCH=(nice -n 19 python3)
[ "${NPROC:-1}" -gt 1 ] && LAUNCH=(nice -n 19 torchrun --standalone --nproc_per_node "$NPROC")

# The fixed mixtures' results do not depend on the composite: copy the finished ones into a sweep's
# folder (without a `fixed` run, nullglob lets the sweep evaluate them itself).
reuse_fixed() {
  mkdir -p "$1"
  shopt -s nullglob
  for d in "$EVAL"/fixed/alpha_*; do [ -e "$1/$(basename "$d")" ] || cp -r "$d" "$1/"; done
}

# A finished sweep's record: sweep.json, comparison.json and the trade-off plot in $2.
record_sweep() {
  mkdir -p "$2"
  cp "$1/sweep.json" "$2/sweep.json"
  python3 -m adaptive_smoothing.cli.plot_results "$1" --output-dir "$2" --title "$3"
}

case "${1:?clean, fixed, pre-attack, train RECIPE, curves RECIPE, sweep RECIPE, calibrate, nonlinear or gate NAME}" in
  clean)
    "${RUN[@]}" --eval --alpha-sweep 0,1 --fixed-alphas-only --n-examples 10000 --no-adaptive \
      --set 'evaluation_settings.attacks_to_run=[]' --output-dir "$EVAL/clean" ;;
  fixed)
    "${RUN[@]}" --eval --alpha-sweep "$ALPHAS" --fixed-alphas-only --output-dir "$EVAL/fixed" ;;
  pre-attack)
    nice -n 19 python3 -m adaptive_smoothing.cli.pre_attack --config "$CONFIG" \
      --output "$RUNS/pa.pt" --data-dir "$DATA" --n-images 5000 --iterations 10 --threads 1 ;;
  train)
    case "${2:?online, pa or nonadaptive}" in
      online) "${RUN[@]}" --training --output-dir "$RUNS/online" ;;
      pa) "${RUN[@]}" --training --output-dir "$RUNS/pa" "${PA[@]}" ;;
      nonadaptive) "${RUN[@]}" --training --output-dir "$RUNS/nonadaptive" \
        --set randomized_attack_settings.comp_loss_wmax=0 ;;
      *) echo "unknown recipe $2" >&2; exit 2 ;;
    esac ;;
  curves)
    RECIPE=${2:?online or pa}
    python3 -m adaptive_smoothing.cli.plot_training "$RUNS/$RECIPE" --output-dir "$HERE/$RECIPE" \
      --title "ResNet-18 (width 16), CIFAR-10, $RECIPE recipe: held-out validation" ;;
  sweep)
    RECIPE=${2:?online or pa}
    OUT="$EVAL/$RECIPE"
    reuse_fixed "$OUT"
    mkdir -p "$HERE/$RECIPE"
    cp "$RUNS/$RECIPE/checkpoints/mixer.pt" "$HERE/$RECIPE/mixer.pt"  # the mixer alone
    "${RUN[@]}" --eval --alpha-sweep "$ALPHAS" --adaptive --output-dir "$OUT" \
      --mixer-checkpoint "$RECIPE/mixer.pt"
    record_sweep "$OUT" "$HERE/$RECIPE" "ResNet-18 (width 16), CIFAR-10, $RECIPE recipe" ;;
  calibrate)
    # Held-out: test images from val_start (5000) on, never the 1,000 evaluated ones.
    nice -n 19 python3 -m adaptive_smoothing.cli.calibrate --config "$CONFIG" --data-dir "$DATA" \
      --threads 1 --device cpu --n-images 2000 --output-dir "$HERE/nonlinear/calibration" \
      --write-config configs/rn18w16_nonlinear_cpu.yaml --beta "${BETA:-95}" \
      --s-range 0.1,100 --p-range 1,10 ;;  # BETA=98.5 with the default grid: calibration_beta98.5.json
  nonlinear)
    OUT="$EVAL/nonlinear"
    reuse_fixed "$OUT"
    "${LAUNCH[@]}" run.py --config configs/rn18w16_nonlinear_cpu.yaml \
      --data-dir "$DATA" --threads 1 --device cpu --eval --alpha-sweep "$ALPHAS" --output-dir "$OUT"
    record_sweep "$OUT" "$HERE/nonlinear" "ResNet-18 (width 16), CIFAR-10: nonlinear mixing" ;;
  gate)
    NAME=${2:?a training folder of $HERE/rob_logits_pilots}
    OUT="$EVAL/gate_$NAME"
    reuse_fixed "$OUT"
    # shellcheck disable=SC2086  # GATE_SET holds several --set arguments
    "${LAUNCH[@]}" run.py --config "${GATE_CONFIG:-configs/rn18w16_rob_logits_raw_cpu.yaml}" \
      --data-dir "$DATA" --threads 1 --device cpu --eval --alpha-sweep "$ALPHAS" --adaptive \
      --mixer-checkpoint "rob_logits_pilots/$NAME/checkpoints/mixer.pt" --output-dir "$OUT" ${GATE_SET:-}
    record_sweep "$OUT" "$HERE/gate_$NAME" "ResNet-18 (width 16), CIFAR-10: rob_logits gate ($NAME)" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
