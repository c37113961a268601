"""Checks made once at load time: in-bank indices, zero-size layers, what pickling keeps."""

import io
import json

import pytest
import torch
from helpers import tiny_bert
from helpers.hf_fakes import write_tiny_bert
from safetensors.torch import load_file, save_file
from torch import nn

from bs_lightning import convert_to_sparse
from bs_lightning.hf import load_sparse, prune_and_convert, save_sparse
from bs_lightning.hf.io import MARKER_FILE, WEIGHTS_FILE
from bs_lightning.nn import BalancedSparseLinear, BalancedSparseLSTM
from bs_lightning.nn.format import check_indices
from bs_lightning.sparsity import find_prunable


def _layer(in_features=16, bank=8, sparsity=0.5):
    torch.manual_seed(0)
    return BalancedSparseLinear.from_dense(nn.Linear(in_features, 4), bank, sparsity=sparsity)


@pytest.mark.parametrize(
    ("in_features", "entry", "value", "match"),
    [
        (
            16,
            1,
            200,
            r"row 2, entry 1 holds in-bank index 200, past a bank of 8 columns \(valid 0..7",
        ),
        # inside the row (column 9 < 16) but past bank 0: as wrong as past the row
        (16, 0, 9, r"row 2, entry 0 holds in-bank index 9, past a bank of 8 columns"),
        # the short last bank of a 20-column row has 4 columns
        (20, 9, 5, r"row 2, entry 9 holds in-bank index 5, past a short last bank of 4 columns"),
    ],
)
def test_bad_index_in_a_state_dict_raises_and_copies_nothing(in_features, entry, value, match):
    layer = _layer(in_features)
    state = layer.state_dict()
    state["indices"] = state["indices"].clone()
    state["indices"][2, entry] = value
    fresh = BalancedSparseLinear(in_features, 4, 8, layer.k)
    before = fresh.values.clone()
    with pytest.raises(RuntimeError, match=r"indices of layer 'BalancedSparseLinear': " + match):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.values, before)


def test_lstm_names_the_matrix():
    torch.manual_seed(0)
    lstm = BalancedSparseLSTM.from_dense(nn.LSTM(16, 8), 8, sparsity=0.5)
    state = lstm.state_dict()
    state["weight_hh_l0_indices"] = state["weight_hh_l0_indices"].clone()
    state["weight_hh_l0_indices"][0, 0] = 8
    model = nn.ModuleDict({"rnn": BalancedSparseLSTM(16, 8, 8, 4)})
    with pytest.raises(RuntimeError, match=r"indices of layer 'rnn.weight_hh_l0': row 0, entry 0"):
        model.load_state_dict({f"rnn.{k}": v for k, v in state.items()})


def test_saved_folder_with_a_bad_index_does_not_load(tmp_path):
    model = prune_and_convert(tiny_bert(), 0.5, bank_size=8)
    save_sparse(model, tmp_path)
    state = load_file(tmp_path / WEIGHTS_FILE)
    key = "encoder.layer.0.attention.self.query.indices"
    state[key][0, 3] = 200
    save_file(state, tmp_path / WEIGHTS_FILE, metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=r"(?s)model.safetensors does not load: .*layer 'encoder.layer.0.attention.self.query': "
        r"row 0, entry 3 holds in-bank index 200",
    ):
        load_sparse(tmp_path)


def test_check_indices_accepts_packed_indices():
    layer = _layer(20)
    check_indices(layer.indices, 8, 20, layer.k)  # no error


def test_zero_size_layers_are_skipped_cleanly():
    model = nn.Sequential(nn.Linear(16, 0), nn.Linear(0, 8), nn.Linear(16, 8))
    assert [p.name for p in find_prunable(model)] == ["2.weight"]
    with torch.no_grad():
        model[2].weight.mul_(torch.arange(16) % 2 == 0)  # 1 of every 2 kept: balanced
    convert_to_sparse(model)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear
    assert type(model[2]) is BalancedSparseLinear


def test_pickling_keeps_no_derived_copies():
    layer = _layer()
    layer(torch.randn(2, 16))  # builds the tile copy (where the kernel runs)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.tile_values.numel() == 0 and loaded.dense_weight.numel() == 0
    assert not loaded._kernel_cache and not loaded._tile_plans
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), layer(x))


def _saved(tmp_path):
    return save_sparse(prune_and_convert(tiny_bert(), 0.5, bank_size=8), tmp_path / "saved")


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        ("truncate", ValueError, r"model.safetensors is not a readable safetensors file"),
        ("invalid_json", ValueError, r"bs_lightning_sparse.json is not valid JSON"),
        ("missing_key", ValueError, r"bs_lightning_sparse.json misses the keys \['dtype'\]"),
        ("dtype", ValueError, r"bs_lightning_sparse.json has dtype 'int8'; valid: a floating"),
        (
            "class",
            ValueError,
            r"model_class 'GPT2Model', which takes a GPT2Config, but .*BertConfig",
        ),
        ("no_weights", FileNotFoundError, r"model.safetensors not found"),
    ],
)
def test_damaged_folder_names_the_file(tmp_path, damage, error, match):
    folder = _saved(tmp_path)
    marker_path, weights = folder / MARKER_FILE, folder / WEIGHTS_FILE
    marker = json.loads(marker_path.read_text())
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "invalid_json":
        marker_path.write_text("{not json")
    elif damage == "missing_key":
        del marker["dtype"]
        marker_path.write_text(json.dumps(marker))
    elif damage in ("dtype", "class"):
        marker.update({"dtype": "int8"} if damage == "dtype" else {"model_class": "GPT2Model"})
        marker_path.write_text(json.dumps(marker))
    else:
        weights.unlink()
    with pytest.raises(error, match=match):
        load_sparse(folder)


def test_convert_cli_refuses_bad_paths_in_one_line(tmp_path):
    from bs_lightning.hf.cli import convert_cli

    folder = _saved(tmp_path)
    common = ["--sparsity", "0.5", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"^bs-convert-hf: --model .* is already a sparse folder"):
        convert_cli(["--model", str(folder), *common])
    with pytest.raises(
        SystemExit, match=r"^bs-convert-hf: --model .*nowhere is not a model folder"
    ):
        convert_cli(["--model", str(tmp_path / "nowhere"), *common])
    (tmp_path / "taken").write_text("x")
    out = ["--sparsity", "0.5", "--out", str(tmp_path / "taken")]
    with pytest.raises(SystemExit, match=r"^bs-convert-hf: --out .*taken is an existing file"):
        convert_cli(["--model", str(write_tiny_bert(tmp_path / "bert")), *out])


def test_report_names_a_malformed_metrics_file(tmp_path, capsys):
    from bs_lightning.report import main as report_main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{broken")
    assert report_main([str(tmp_path)]) == 2
    assert "run/metrics.json is not valid JSON" in capsys.readouterr().err
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"pattern": "balanced"}))
    assert report_main([str(tmp_path)]) == 2
    assert "run/metrics.json misses ['sparsity'" in capsys.readouterr().err
