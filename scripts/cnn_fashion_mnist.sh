#!/usr/bin/env bash
# Reproduces docs/results/cnn_fashion_mnist.{md,json,png} on a CPU (needs the Debian package
# dataset-fashion-mnist): the VGG-style CNN of recipe cnn_fashion_mnist trained dense, and
# trained with gradual pruning (BalancedPruningCallback) to balanced (banks of 16),
# unstructured and block 4x4 sparsity at 80/90/95%, as Hydra multiruns, then bs-report over
# the 10 runs. Every run trains from scratch with the same seed and schedule.
# Usage: scripts/cnn_fashion_mnist.sh [OUT_DIR]   (default outputs/cnn_fashion_mnist)
#   EPOCHS: training epochs per run (default 5; 430 optimizer steps each)
#   START_STEP, END_STEP, FREQUENCY: the pruning schedule (default 400, 1500, 50: dense for
#     about one epoch, cubic to the target by 70% of training, then fine-tuning)
#   THREADS: torch threads per run (default 1)
#   PARALLEL=1: two runs at a time (balanced then dense; unstructured then block)
#   EXTRA: more Hydra overrides for every run
#   NAME: docs/results/NAME.{md,json,png} to write (default cnn_fashion_mnist)
set -euo pipefail
OUT=${1:-outputs/cnn_fashion_mnist}
EPOCHS=${EPOCHS:-5}
SCHEDULE="pruning.start_step=${START_STEP:-400} pruning.end_step=${END_STEP:-1500} \
pruning.frequency=${FREQUENCY:-50}"
COMMON="trainer.max_epochs=$EPOCHS threads=${THREADS:-1} trainer.enable_progress_bar=false \
${EXTRA:-}"
NAME=${NAME:-cnn_fashion_mnist}
export BS_LIGHTNING_NO_CUDA=${BS_LIGHTNING_NO_CUDA:-1}
mkdir -p "$OUT"

sweep() {
  # shellcheck disable=SC2086
  bs-train -m recipe=cnn_fashion_mnist $COMMON $SCHEDULE pruning.pattern="$1" \
    pruning.sparsity=0.8,0.9,0.95 \
    hydra.sweep.dir="$OUT/sweep_$1"
}
dense() {
  # shellcheck disable=SC2086
  bs-train recipe=cnn_fashion_mnist pruning.sparsity=0 $COMMON hydra.run.dir="$OUT/dense"
}
if [ "${PARALLEL:-0}" = 1 ]; then
  (sweep balanced && dense) > "$OUT/stream_balanced_dense.log" 2>&1 &
  (sweep unstructured && sweep block) > "$OUT/stream_unstructured_block.log" 2>&1 &
  wait
else
  for pattern in balanced unstructured block; do sweep "$pattern"; done
  dense
fi

bs-report "$OUT" --out "$OUT" --title "cnn_fashion_mnist: VGG-style CNN on Fashion-MNIST, CPU"
mkdir -p docs/results
cp "$OUT/report.md" "docs/results/$NAME.md"
cp "$OUT/report.json" "docs/results/$NAME.json"
cp "$OUT/accuracy_vs_speedup.png" "docs/results/$NAME.png"
