#!/usr/bin/env bash
# Reproduces docs/results/lstm_ptb_small.{md,json,png} on a CPU (needs PTB in
# ../shared/data/ptb or $BS_PTB_ROOT): one dense pretraining run (OUT_pretrain), then from
# its checkpoint the 9 pruning runs (balanced / unstructured / block 4x4 at 60/80/90%) as
# Hydra multiruns and one dense run with the same fine-tuning steps (the fair dense cell),
# then bs-report over these 10 runs.
# Usage: scripts/lstm_ptb_small.sh [OUT_DIR]   (default outputs/lstm_ptb_small)
#   PRETRAIN_BATCHES: BPTT windows per epoch of dense pretraining (default 830 = all)
#   PRETRAIN_EPOCHS: epochs of dense pretraining (default 2)
#   FINETUNE_BATCHES: BPTT windows of each pruning run (default 200); the target sparsity is
#     reached after 70% of them (pruning.end_step), then the rest fine-tunes
#   PRUNE_EPOCHS: instead of FINETUNE_BATCHES, prune over this many full epochs (830 windows
#     each), then fine-tune FINETUNE_EPOCHS more (default 1) with the learning rate halved
#     per epoch, as the recipe's dense schedule continued would (model.lr_decay_start)
#   SPARSITIES: targets of the three patterns' sweeps (default 0.6,0.8,0.9)
#   BANKS: more balanced bank sizes, run at BANK_SPARSITY (default 0.8), e.g. BANKS=25,100
#     (the recipe's bank is 50); docs/results/lstm_ptb_long.* holds the balanced and
#     unstructured runs of PRUNE_EPOCHS=2 SPARSITIES=0.8,0.9 BANKS=25,100 PARALLEL=1
#     NAME=lstm_ptb_long (made in two parts; lstm_ptb_long_more.* holds the second)
#   PRETRAIN_DIR: folder of the dense pretraining run to start from (default OUT_pretrain)
#   EXTRA: more Hydra overrides for the 10 runs; docs/results/lstm_ptb_small_all_layers.* (the
#     decoder pruned too) came from EXTRA=pruning.exclude=null NAME=lstm_ptb_small_all_layers
#   NAME: docs/results/NAME.{md,json,png} to write (default lstm_ptb_small)
#   PARALLEL=1: run the three patterns' sweeps at once (on a CPU shared with other jobs this
#   gets a larger share of it)
set -euo pipefail
OUT=${1:-outputs/lstm_ptb_small}
PRETRAIN_BATCHES=${PRETRAIN_BATCHES:-830}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-2}
SPARSITIES=${SPARSITIES:-0.6,0.8,0.9}
if [ -n "${PRUNE_EPOCHS:-}" ]; then
  FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-1}
  FINETUNE="trainer.limit_train_batches=null trainer.max_epochs=$((PRUNE_EPOCHS + FINETUNE_EPOCHS))
    pruning.end_step=$((PRUNE_EPOCHS * 830)) model.lr_decay_start=$PRUNE_EPOCHS"
  LENGTH="pruned over $PRUNE_EPOCHS epochs + $FINETUNE_EPOCHS fine-tuning"
else
  FINETUNE_BATCHES=${FINETUNE_BATCHES:-200}
  FINETUNE="trainer.limit_train_batches=$FINETUNE_BATCHES
    pruning.end_step=$((FINETUNE_BATCHES * 7 / 10))"
  LENGTH="$FINETUNE_BATCHES fine-tuning windows"
fi
FINETUNE="$FINETUNE ${EXTRA:-}"

PRE="${PRETRAIN_DIR:-${OUT}_pretrain}"
NAME=${NAME:-lstm_ptb_small}
CKPT="$PRE/checkpoints/last.ckpt"
# the CPU kernels are all this machine runs: do not spend minutes compiling the CUDA ones
export BS_LIGHTNING_NO_CUDA=${BS_LIGHTNING_NO_CUDA:-1}

if [ ! -f "$CKPT" ]; then
  bs-train recipe=lstm_ptb_small pruning.sparsity=0 trainer.max_epochs="$PRETRAIN_EPOCHS" \
    trainer.limit_train_batches="$PRETRAIN_BATCHES" trainer.enable_progress_bar=false \
    hydra.run.dir="$PRE"
fi
mkdir -p "$OUT"

# One multirun over the sparsities per pattern. The pretrain run already tested the dense
# weights: skip that test pass in every pruning run.
sweep() {
  # shellcheck disable=SC2086
  bs-train -m recipe=lstm_ptb_small init_from="$CKPT" $FINETUNE \
    evaluate.test_dense_baseline=false trainer.enable_progress_bar=false \
    pruning.pattern="$1" pruning.sparsity="$SPARSITIES" hydra.sweep.dir="$OUT/sweep_$1"
}
banks() {
  # shellcheck disable=SC2086,SC2016
  bs-train -m recipe=lstm_ptb_small init_from="$CKPT" $FINETUNE \
    evaluate.test_dense_baseline=false trainer.enable_progress_bar=false \
    pruning.pattern=balanced pruning.sparsity="${BANK_SPARSITY:-0.8}" pruning.bank_size="$BANKS" \
    hydra.sweep.dir="$OUT/sweep_banks" \
    'hydra.sweep.subdir=${hydra.job.num}_balanced_bank${pruning.bank_size}_${pruning.sparsity}'
}
dense() {
  # shellcheck disable=SC2086
  bs-train recipe=lstm_ptb_small init_from="$CKPT" pruning.sparsity=0 $FINETUNE \
    trainer.enable_progress_bar=false hydra.run.dir="$OUT/dense"
}
if [ "${PARALLEL:-0}" = 1 ]; then
  for pattern in balanced unstructured block; do
    sweep "$pattern" > "$OUT/sweep_$pattern.log" 2>&1 &
  done
  if [ -n "${BANKS:-}" ]; then banks > "$OUT/sweep_banks.log" 2>&1 & fi
  dense > "$OUT/dense.log" 2>&1 &
  wait
else
  for pattern in balanced unstructured block; do sweep "$pattern"; done
  if [ -n "${BANKS:-}" ]; then banks; fi
  dense
fi

bs-report "$OUT" --out "$OUT" --title "lstm_ptb_small ($LENGTH): 2x200 LSTM LM on PTB, 2-core CPU"
mkdir -p docs/results
cp "$OUT/report.md" "docs/results/$NAME.md"
cp "$OUT/report.json" "docs/results/$NAME.json"
cp "$OUT/accuracy_vs_speedup.png" "docs/results/$NAME.png"
