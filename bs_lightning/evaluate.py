"""Test-split evaluation after fit: dense baseline, pruned model, converted sparse model, and
inference latency of dense vs converted on the run's device (one process, interleaved)."""

import lightning.pytorch as pl
from torch import nn

from bs_lightning.bench.timing import measure_latency
from bs_lightning.convert import conversion_report, convert_to_sparse
from bs_lightning.sparsity import SparsityPlan, find_prunable
from bs_lightning.validation import is_dense_target


def clone_model(model: pl.LightningModule) -> pl.LightningModule:
    """A fresh copy of `model` built from its saved hyperparameters, with its weights.

    `copy.deepcopy` is not used: a module attached to a Trainer would copy the Trainer too.
    What was pruned how travels separately, as a `SparsityPlan`.
    """
    clone = type(model)(**model.hparams)
    clone.load_state_dict(model.state_dict())
    return clone


def test_metric(trainer: pl.Trainer, model: pl.LightningModule, datamodule) -> float:
    """Run `trainer.test` and return the model's `test_metric` (e.g. `test/ppl`)."""
    results = trainer.test(model, datamodule=datamodule, verbose=False)
    return float(results[0][model.test_metric])


def weight_sparsity(model: nn.Module, include=None, exclude=None) -> float:
    """Fraction of exact zeros over the prunable weights that `include`/`exclude` select
    (the same selection rule as the pruning callback)."""
    params = [p.param for p in find_prunable(model, include, exclude)]
    zeros = sum(int((p == 0).sum()) for p in params)
    return zeros / sum(p.numel() for p in params)


def evaluate_run(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule,
    *,
    plan: SparsityPlan | None,
    sparsity,
    include=None,
    exclude=None,
    dense_model: pl.LightningModule | None = None,
    test_dense_baseline: bool = True,
    convert: bool = True,
    latency_batch_size: int = 1,
    latency_warmup: int = 5,
    latency_repeats: int = 30,
) -> dict:
    """Evaluate a trained (pruned or dense) model on the test split.

    Args:
        trainer: a Trainer for testing (no pruning callback).
        model: the model after fit.
        datamodule: its data; the first test batch (first `latency_batch_size` rows) feeds
            the latency measurement.
        plan: what the run pruned how (`BalancedPruningCallback.plan`); None for a dense run.
            Layers whose pattern has a sparse format (balanced, N:M) are converted with it.
        sparsity: target sparsity of the run (0 = dense run; a mapping for per-layer targets).
        include, exclude: the pruning selection, for the effective sparsity.
        dense_model: the dense starting point, tested as the dense baseline when given.
        test_dense_baseline: test `dense_model` (False saves a test pass when many runs
            start from the same checkpoint).
        convert: convert a balanced model and test the converted one.
        latency_batch_size, latency_warmup, latency_repeats: see `measure_latency`.

    Returns:
        A JSON-able dict: `metric_name`, `higher_is_better`, `dense` (baseline metric or
        None), `pruned` (metric), `effective_sparsity`, `converted` (metric or None),
        `conversion` (what happened), `latency` (device, batch size, dense_ms, converted_ms,
        speedup).
    """
    is_dense_run = is_dense_target(sparsity)
    pruned_metric = test_metric(trainer, model, datamodule)
    if dense_model is not None and test_dense_baseline:
        dense_metric = test_metric(trainer, dense_model, datamodule)
    else:
        dense_metric = pruned_metric if is_dense_run else None

    converted = None
    if is_dense_run:
        conversion = "dense run: nothing to convert"
    elif not convert:
        conversion = "conversion disabled (evaluate.convert=false)"
    elif plan is None:
        conversion = "no sparsity plan: nothing to convert"
    elif not any(entry.pattern.converts for entry in plan):
        patterns = sorted({entry.pattern.describe() for entry in plan})
        conversion = f"pattern {patterns} has no sparse format: only balanced and N:M convert"
    else:
        converted = convert_to_sparse(clone_model(model), plan=plan, strict=True)
        done, left = conversion_report(converted, plan)
        conversion = (
            f"converted {len(done)} of {len(done) + len(left)} pruned layers (strict) to "
            f"balanced sparse modules" + (f"; left dense: {left}" if left else "")
        )
    converted_metric = (
        test_metric(trainer, converted, datamodule) if converted is not None else None
    )

    x = next(iter(datamodule.test_dataloader()))[0][:latency_batch_size]
    timed = {"dense": model} if converted is None else {"dense": model, "converted": converted}
    ms = measure_latency(timed, x, trainer.strategy.root_device, latency_warmup, latency_repeats)
    latency = {
        "device": str(trainer.strategy.root_device),
        "input_shape": list(x.shape),
        "dense_ms": ms["dense"],
        "converted_ms": ms.get("converted"),
        "speedup": ms["dense"] / ms["converted"] if "converted" in ms else None,
    }
    return {
        "metric_name": model.test_metric,
        "higher_is_better": model.higher_is_better,
        "dense": dense_metric,
        "pruned": pruned_metric,
        "effective_sparsity": weight_sparsity(model, include, exclude),
        "converted": converted_metric,
        "conversion": conversion,
        "latency": latency,
    }
