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
"""

import time
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from bs_lightning.config_paths import config_dirs, register_recipes
from bs_lightning.evaluate import clone_model, evaluate_run
from bs_lightning.report import write_run_report

CONF_DIR, RECIPES_DIR = config_dirs()
register_recipes(RECIPES_DIR)


def _is_dense(sparsity) -> bool:
    return not isinstance(sparsity, dict) and float(sparsity) == 0.0


def build_pruning_callback(pruning: dict):
    """The pruning callback for the `pruning` config, or None for a dense run (sparsity 0).

    Every key of the config is a keyword argument of `BalancedPruningCallback`, which
    validates them (and raises, naming the parameter and the valid values).
    """
    if _is_dense(pruning["sparsity"]):
        return None
    from bs_lightning.callbacks import BalancedPruningCallback

    return BalancedPruningCallback(**pruning)


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
    the pruning callback unless `pruning.sparsity` is 0, then evaluates on the test split
    (`bs_lightning.evaluate.evaluate_run`) and writes the run's report into `output_dir`.

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
    pruning = OmegaConf.to_container(cfg.pruning, resolve=True)
    pruning_callback = build_pruning_callback(pruning)

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
        pattern=pruning["pattern"],
        sparsity=pruning["sparsity"],
        include=pruning.get("include"),
        exclude=pruning.get("exclude"),
        dense_model=dense_model,
        **OmegaConf.to_container(cfg.evaluate, resolve=True),
    )
    metrics = {
        "run_name": cfg.run_name,
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        "pattern": pruning["pattern"],
        "sparsity": pruning["sparsity"],
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


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Entry point of `bs-train`; returns the pruned model's test metric (for sweepers)."""
    metrics = train(cfg)
    print(f"{metrics['metric_name']}: pruned {metrics['pruned']:.4f}, results in {cfg.output_dir}")
    return metrics["pruned"]


if __name__ == "__main__":
    main()
