#!/usr/bin/env bash
# Reproduces docs/results/lstm_ptb_small.{md,json,png} on a CPU (needs PTB in
# ../shared/data/ptb or $BS_PTB_ROOT): one dense pretraining run, then the 9 pruning runs
# (balanced / unstructured / block 4x4 at 60/80/90%) as Hydra multiruns starting from its
# checkpoint, then bs-report over all 10 runs.
# Usage: scripts/lstm_ptb_small.sh [OUT_DIR]   (default outputs/lstm_ptb_small)
#   PRETRAIN_BATCHES: BPTT windows of dense pretraining (default 300; 830 = one epoch)
#   PARALLEL=1: run the three patterns' sweeps at once (on a CPU shared with other jobs this
#   gets a larger share of it)
set -euo pipefail
OUT=${1:-outputs/lstm_ptb_small}
PRETRAIN_BATCHES=${PRETRAIN_BATCHES:-300}

if [ ! -f "$OUT/pretrain/checkpoints/last.ckpt" ]; then
  bs-train recipe=lstm_ptb_small pruning.sparsity=0 \
    trainer.limit_train_batches="$PRETRAIN_BATCHES" trainer.enable_progress_bar=false \
    hydra.run.dir="$OUT/pretrain"
fi

# One multirun over the sparsities per pattern. The pretrain run already tested the dense
# weights: skip that test pass in every pruning run.
sweep() {
  bs-train -m recipe=lstm_ptb_small init_from="$OUT/pretrain/checkpoints/last.ckpt" \
    evaluate.test_dense_baseline=false trainer.enable_progress_bar=false \
    pruning.pattern="$1" pruning.sparsity=0.6,0.8,0.9 hydra.sweep.dir="$OUT/sweep_$1"
}
if [ "${PARALLEL:-0}" = 1 ]; then
  for pattern in balanced unstructured block; do
    sweep "$pattern" > "$OUT/sweep_$pattern.log" 2>&1 &
  done
  wait
else
  for pattern in balanced unstructured block; do sweep "$pattern"; done
fi

bs-report "$OUT" --out "$OUT" --title "lstm_ptb_small: 2x200 LSTM LM on PTB, 2-core CPU"
mkdir -p docs/results
cp "$OUT/report.md" docs/results/lstm_ptb_small.md
cp "$OUT/report.json" docs/results/lstm_ptb_small.json
cp "$OUT/accuracy_vs_speedup.png" docs/results/lstm_ptb_small.png
