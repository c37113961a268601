"""`bs-train`: train (dense or from a checkpoint), prune gradually, convert, evaluate, report.

`bs-train recipe=quickstart` runs a complete experiment from `recipes/`; any config value can
be overridden (`bs-train recipe=lstm_ptb_small pruning.sparsity=0.9`), and Hydra's multirun
sweeps patterns x sparsities:
`bs-train -m recipe=lstm_ptb_small pruning.pattern=balanced,unstructured,block pruning.sparsity=0.6,0.8,0.9`.
Each run writes `report.md`, `metrics.json` and `accuracy_vs_speedup.png` into its folder;
`bs-report DIR` aggregates a multirun folder.

Contract with the config groups (what a new model or data option must provide):
- `data`: a LightningDataModule with `model_kwargs()` (sizes the model needs) after `setup()`.
- `model`: a LightningModule taking those sizes as keyword arguments, calling
  `save_hyperparameters()`, with class attributes `test_metric` (a key its test logs) and
  `higher_is_better`.
- `pruning`: a callback config with `_target_` (`bs_lightning.BalancedPruningCallback`), built
  with `hydra.utils.instantiate` unless its `sparsity` is dense
  (`bs_lightning.validation.is_dense_target`).

Importing this module has no side effects: `main()` registers the recipes in Hydra's
ConfigStore before Hydra composes (code that composes itself calls
`bs_lightning.config_paths.compose_config` or `register_recipes` first).
"""

import time
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from bs_lightning.config_paths import config_dirs, register_recipes
from bs_lightning.evaluate import clone_model, evaluate_run
from bs_lightning.report import write_run_report
from bs_lightning.validation import is_dense_target


def build_pruning_callback(pruning: DictConfig | dict) -> Callback | None:
    """The pruning callback of the `pruning` config, or None for a dense run.

    The config names the callback class in `_target_` (`bs_lightning.BalancedPruningCallback`)
    and holds its keyword arguments; the callback validates them (and raises, naming the
    parameter and the valid values). A run is dense when `pruning.sparsity` prunes nothing
    (`bs_lightning.validation.is_dense_target`: 0, or a mapping of zeros); then nothing is
    built.

    Args:
        pruning: the composed `pruning` node (or the same as a plain dict).

    Returns:
        The instantiated callback, or None for a dense run.

    Raises:
        ValueError: the callback's own, for a bad value (naming the parameter and the valid
            values), unwrapped from Hydra's InstantiationException.
        hydra.errors.InstantiationException: for any other failure to build it (e.g. a
            `_target_` that does not import).
    """
    if is_dense_target(pruning.get("sparsity")):
        return None
    try:
        # plain lists and dicts (not ListConfig/DictConfig) for globs and per-layer targets
        return instantiate(pruning, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError):
            raise ValueError(f"pruning: {err.__cause__}") from err.__cause__
        raise


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load the weights of a Lightning checkpoint (its `state_dict`) or of a plain state_dict
    file into `model`.

    Raises:
        FileNotFoundError: if `path` does not exist.
        RuntimeError: naming the file, if the weights do not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from={path}: no such checkpoint file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise RuntimeError(
            f"init_from={path}: its weights do not fit {type(model).__name__} "
            f"(was it trained with the same model config?): {err}"
        ) from err


def _output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir)


def train(cfg: DictConfig) -> dict:
    """Run one experiment described by a composed config (see conf/config.yaml).

    Fits the model (from `init_from` weights or fresh; resuming `ckpt_path` when given) with
    the pruning callback unless the run is dense (`build_pruning_callback`), then evaluates
    on the test split (`bs_lightning.evaluate.evaluate_run`, given the callback's sparsity
    plan) and writes the run's report into `output_dir`.

    Args:
        cfg: the composed config.

    Returns:
        The run's metrics (also written to `output_dir/metrics.json`).

    Raises:
        ValueError: for bad config values (raised by the component that owns the value,
            naming it), before any training.
    """
    start = time.perf_counter()
    out = _output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True)
    pruning_callback = build_pruning_callback(cfg.pruning)
    # the pruning values as plain Python, for the evaluation and metrics.json
    pruning = OmegaConf.to_container(cfg.pruning, resolve=True)

    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")  # the model's sizes come from the data
    model = instantiate(cfg.model, _convert_="all", **datamodule.model_kwargs())
    dense_model = None
    if cfg.init_from is not None:
        load_weights(model, cfg.init_from)
        dense_model = clone_model(model)

    callbacks = [ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0)]
    if pruning_callback is not None:
        callbacks.append(pruning_callback)
    logger = instantiate(cfg.logger) if cfg.logger.get("_target_") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=out)
    fit_start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    fit_time = time.perf_counter() - fit_start

    # a plain Trainer for testing: the pruning callback has no business with the
    # converted model, and test results go to metrics.json rather than the training logs
    tester = instantiate(
        cfg.trainer,
        callbacks=[],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=out,
    )
    evaluation = evaluate_run(
        tester,
        model,
        datamodule,
        plan=pruning_callback.plan if pruning_callback is not None else None,
        sparsity=pruning.get("sparsity"),
        include=pruning.get("include"),
        exclude=pruning.get("exclude"),
        dense_model=dense_model,
        **OmegaConf.to_container(cfg.evaluate, resolve=True),
    )
    metrics = {
        "run_name": cfg.run_name,
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        "pattern": pruning.get("pattern"),
        "pattern_options": pruning_callback.pattern.to_dict() if pruning_callback else None,
        "sparsity": pruning.get("sparsity"),
        "bank_size": pruning.get("bank_size"),
        "block_size": pruning.get("block_size"),
        "init_from": cfg.init_from,
        "threads": torch.get_num_threads(),
        **evaluation,
        "fit_time_s": fit_time,
        "wall_time_s": time.perf_counter() - start,
    }
    if HydraConfig.initialized():
        metrics["overrides"] = list(HydraConfig.get().overrides.task)
    write_run_report(out, metrics)
    return metrics


def _run(cfg: DictConfig) -> float:
    """Hydra's task function: one run of `train`; returns the pruned model's test metric."""
    metrics = train(cfg)
    print(f"{metrics['metric_name']}: pruned {metrics['pruned']:.4f}, results in {cfg.output_dir}")
    return metrics["pruned"]


def main() -> None:
    """Entry point of `bs-train`: registers the recipes, then runs Hydra on `conf/config.yaml`.

    Hydra parses the command line (`recipe=NAME`, overrides, `-m` for a multirun) and calls
    `train` once per run; a sweeper gets each run's pruned test metric.
    """
    conf_dir, recipes_dir = config_dirs()
    register_recipes(recipes_dir)  # the `recipe` group must exist before Hydra composes
    hydra.main(version_base="1.3", config_path=str(conf_dir), config_name="config")(_run)()


if __name__ == "__main__":
    main()
