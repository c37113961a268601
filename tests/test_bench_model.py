"""bs-bench model: sources, rows, files and errors (what it measures is not asserted)."""

import json

import lightning
import pytest
import torch
from helpers.hf_fakes import write_tiny_bert
from lightning.pytorch import LightningModule
from omegaconf import OmegaConf
from recipe_overrides import tiny

from bs_lightning.bench.cli import main as bench_main
from bs_lightning.bench.model import PLOT_FILE, main
from bs_lightning.config_paths import compose_config
from bs_lightning.hf import prune_and_convert, save_sparse
from bs_lightning.train import train

FAST = ["--seq-lens", "8", "--repeats", "1", "--warmup", "0"]


def _rows(out):
    record = json.loads((out / "results.json").read_text())
    assert (out / "results.md").is_file() and (out / PLOT_FILE).is_file()
    return record["rows"]


def test_hf_folder_one_row_per_sparsity_and_shape(tmp_path, capsys):
    bert = write_tiny_bert(tmp_path / "bert")
    out = tmp_path / "out"
    args = [str(bert), "--sparsities", "0.5", "0.75", "--batches", "1", "2", *FAST]
    assert bench_main(["model", *args, "--out-dir", str(out)]) == 0
    rows = _rows(out)
    assert [(r["sparsity"], r["batch"], r["seq_len"]) for r in rows] == [
        (0.5, 1, 8),
        (0.5, 2, 8),
        (0.75, 1, 8),
        (0.75, 2, 8),
    ]
    for row in rows:
        assert row["mode"] == "eager" and row["layers_converted"] == "12 of 12"
        assert row["max_abs_diff"] < 1e-4
        assert row["dense_ms"] > 0 and row["converted_ms"] > 0
    printed = capsys.readouterr().out
    assert "[1/4] eager sparsity 0.50 batch 1 seq 8:" in printed and "ETA" in printed
    assert "| eager | 0.75 | 2 | 8 | 12 of 12 |" in (out / "results.md").read_text()


def test_saved_sparse_folder_reads_its_sparsity(tmp_path):
    save_sparse(prune_and_convert(_bert(tmp_path), 0.75, 16), tmp_path / "s")
    out = tmp_path / "out"
    assert main([str(tmp_path / "s"), "--sparsities", "0.5", *FAST, "--out-dir", str(out)]) == 0
    rows = _rows(out)
    assert [(r["sparsity"], r["layers_converted"]) for r in rows] == [(0.75, "12 of 12")]
    assert rows[0]["max_abs_diff"] < 1e-4


def _bert(tmp_path):
    from transformers import BertModel

    return BertModel.from_pretrained(write_tiny_bert(tmp_path / "bert")).eval()


def test_bs_train_run_folder(tmp_path):
    cfg = compose_config(tiny("transformer_ptb", tmp_path))
    train(cfg)
    run = tmp_path / "run"
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # as bs-train's Hydra writes it
    out = tmp_path / "out"
    assert main([str(run), *FAST, "--out-dir", str(out)]) == 0
    (row,) = _rows(out)
    # the recipe prunes linear1 and linear2 of both encoder layers
    assert row["sparsity"] == pytest.approx(0.8) and row["layers_converted"] == "4 of 4"
    assert row["max_abs_diff"] < 1e-4


def test_bs_train_cnn_run_takes_images(tmp_path, capsys):
    cfg = compose_config(tiny("cnn_fashion_mnist", tmp_path))
    train(cfg)
    run = tmp_path / "run"
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    out = tmp_path / "out"
    assert main([str(run), "--batches", "1", "4", *FAST, "--out-dir", str(out)]) == 0
    rows = _rows(out)
    # images [batch, 1, 28, 28]: one row per batch, no sequence length
    assert [(r["batch"], r["seq_len"]) for r in rows] == [(1, None), (4, None)]
    assert all(r["max_abs_diff"] < 1e-4 and r["speedup"] > 0 for r in rows)
    done, of = rows[0]["layers_converted"].split(" of ")
    assert done == of != "0"  # every pruned convolution and linear layer converted
    assert "[2/2] eager sparsity" in capsys.readouterr().out
    assert "| 4 | - |" in (out / "results.md").read_text()


class NoInputModel(LightningModule):
    """A run's model with neither `vocab_size` nor `input_shape`: nothing to feed it."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(width, width)


def test_run_without_an_input_says_so(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(
        {"model": {"_target_": "test_bench_model.NoInputModel"}}, run / ".hydra" / "config.yaml"
    )
    model = NoInputModel()
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        run / "checkpoints" / "last.ckpt",
    )
    with pytest.raises(
        SystemExit, match="NoInputModel has neither a vocab_size nor an input_shape"
    ):
        main([str(run), *FAST])


def test_not_a_model_says_so_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty is not a Hugging Face model folder, a bs-train"):
        main([str(tmp_path / "empty"), *FAST])
    (tmp_path / "ckpt_alone.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"config.yaml not found: .* is not in a bs-train run"):
        main([str(tmp_path / "ckpt_alone.ckpt"), *FAST])


@pytest.mark.slow
def test_compiled_rows(tmp_path):
    bert = write_tiny_bert(tmp_path / "bert")
    out = tmp_path / "out"
    assert main([str(bert), "--sparsities", "0.9", "--compile", *FAST, "--out-dir", str(out)]) == 0
    rows = _rows(out)
    assert [r["mode"] for r in rows] == ["eager", "compiled"]
    assert "error" not in rows[1], rows[1]
