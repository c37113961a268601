"""bs-bench finetune: both sides train, the files and the errors (what it measures is not
asserted)."""

import json

import pytest
from helpers.hf_fakes import write_tiny_bert

from bs_lightning.bench.cli import main as bench_main

FAST = ["--batch", "2", "--seq-len", "8", "--steps", "2", "--warmup", "1", "--memory-steps", "2"]


def test_tiny_bert_dense_and_converted_train(tmp_path, capsys):
    bert = write_tiny_bert(tmp_path / "bert")
    out = tmp_path / "out"
    args = ["finetune", str(bert), "--sparsity", "0.75", "--bank-size", "16", *FAST]
    assert bench_main([*args, "--out-dir", str(out)]) == 0
    record = json.loads((out / "finetune.json").read_text())
    dense, sparse = record["dense"], record["sparse"]
    for side in (dense, sparse):
        assert side["step_ms"] > 0 and side["peak_rss_mib"] >= side["built_rss_mib"] > 0
        assert side["first_loss"] > 0 and side["last_loss"] > 0
    # the converted encoder trains its values only: fewer trainable numbers, same model
    assert 0 < sparse["trainable_params"] < dense["trainable_params"]
    assert sparse["state_mib"] < dense["state_mib"]
    assert "| converted |" in (out / "finetune.md").read_text()
    assert "Converted vs dense: step time" in capsys.readouterr().out


def test_a_path_that_is_not_a_model_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="cannot load .* as a model"):
        bench_main(["finetune", str(tmp_path / "nothing"), *FAST, "--out-dir", str(tmp_path)])
