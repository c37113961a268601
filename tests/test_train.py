"""train(cfg): starting from a dense checkpoint, checkpoint errors, loggers."""

import pytest
import torch
from recipe_overrides import tiny

from bs_lightning.config_paths import compose_config
from bs_lightning.models import MLPClassifier
from bs_lightning.train import load_weights, train


@pytest.fixture(autouse=True)
def _no_kernel_build(monkeypatch):
    # compiling the kernels takes minutes on a busy CPU: use a cached library when there is
    # one, else the reference path (conversion and its metrics do not depend on which)
    monkeypatch.setenv("BS_LIGHTNING_NO_BUILD", "1")


def _compose(overrides):
    # registers the recipes first: importing bs_lightning.train does not
    return compose_config(overrides)


def test_prune_from_a_dense_checkpoint(tmp_path):
    dense = train(_compose(tiny("quickstart", tmp_path / "dense", "pruning.sparsity=0")))
    assert dense["conversion"] == "dense run: nothing to convert"
    assert dense["effective_sparsity"] == 0.0 and dense["dense"] == dense["pruned"]
    assert dense["latency"]["speedup"] is None
    ckpt = tmp_path / "dense" / "run" / "checkpoints" / "last.ckpt"
    pruned = train(
        _compose(tiny("quickstart", tmp_path / "pruned", f"init_from={ckpt}", "logger=none"))
    )
    # the dense baseline is the checkpoint's weights, tested on the same split
    assert pruned["dense"] == pytest.approx(dense["pruned"])
    assert pruned["init_from"] == str(ckpt)
    assert pruned["effective_sparsity"] > 0.7
    assert not (tmp_path / "pruned" / "run" / "logs").exists()  # logger=none


def test_load_weights_errors(tmp_path):
    model = MLPClassifier(10, (1, 8, 8), [16])
    with pytest.raises(FileNotFoundError, match="init_from=.*no such checkpoint file"):
        load_weights(model, tmp_path / "missing.ckpt")
    torch.save(MLPClassifier(10, (1, 8, 8), [32]).state_dict(), tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match="init_from=.*do not fit MLPClassifier"):
        load_weights(model, tmp_path / "other.pt")
    # a plain state_dict file loads too
    source = MLPClassifier(10, (1, 8, 8), [16])
    torch.save(source.state_dict(), tmp_path / "same.pt")
    load_weights(model, tmp_path / "same.pt")
    assert torch.equal(model.net[1].weight, source.net[1].weight)


def test_tensorboard_logger(tmp_path):
    train(_compose(tiny("quickstart", tmp_path, "logger=tensorboard", "pruning.sparsity=0")))
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
