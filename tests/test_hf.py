"""bs_lightning.hf: layer selection, one-shot pruning + conversion, save/load, errors.

Tiny randomly initialised BERT, GPT-2 and Llama models (`helpers`, no download).
"""

from __future__ import annotations

import copy
import json

import helpers
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from bs_lightning import SparsityPlan
from bs_lightning.hf import load_sparse, prune_and_convert, save_sparse
from bs_lightning.hf.io import MARKER_FILE, WEIGHTS_FILE
from bs_lightning.hf.prune import prune_balanced_
from bs_lightning.hf.select import select_layers
from bs_lightning.nn import BalancedSparseConv1D, BalancedSparseConv2d, BalancedSparseLinear

VOCAB = 96
SEQ = 12


def tiny_bert(hidden: int = 32, intermediate: int = 64) -> BertForSequenceClassification:
    return helpers.tiny_bert(
        BertForSequenceClassification, VOCAB, hidden, intermediate, num_labels=3
    )


def tiny_gpt2() -> GPT2LMHeadModel:
    return helpers.tiny_gpt2(VOCAB, bos_token_id=0, eos_token_id=0)


def tiny_llama() -> LlamaForCausalLM:
    return helpers.tiny_llama(VOCAB)


BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
# expected default selection per block (suffix after the block index)
BLOCK_LAYERS = {
    "bert": (
        "bert.encoder.layer.{i}.",
        [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ],
    ),
    "gpt2": ("transformer.h.{i}.", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "llama": (
        "model.layers.{i}.",
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ],
    ),
}


def tokens(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).logits


def pruned_reference(model: nn.Module, sparsity: float, bank_size: int, **globs) -> nn.Module:
    ref = copy.deepcopy(model)
    prune_balanced_(select_layers(ref, **globs), sparsity, bank_size)
    return ref


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_default_selection_is_the_block_projections(arch):
    model = BUILDERS[arch]()
    prefix, suffixes = BLOCK_LAYERS[arch]
    expected = [prefix.format(i=i) + s for i in range(2) for s in suffixes]
    names = [n for n, _ in select_layers(model)]
    assert sorted(names) == sorted(expected)


def test_include_and_exclude_globs():
    model = tiny_bert()
    names = [n for n, _ in select_layers(model, include="*.attention.self.*", exclude="*.key")]
    assert names == [
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    ]
    # include may also name layers outside the blocks (the pooler), which stay Linear-like
    assert [n for n, _ in select_layers(model, include="bert.pooler.dense")] == [
        "bert.pooler.dense"
    ]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_prune_and_convert_matches_pruned_dense(arch):
    model = BUILDERS[arch]()
    sparsity, bank = 0.75, 16
    ref = pruned_reference(model, sparsity, bank)
    out = prune_and_convert(model, sparsity, bank_size=bank)
    assert out is model
    prefix, suffixes = BLOCK_LAYERS[arch]
    for i in range(2):
        for s in suffixes:
            name = prefix.format(i=i) + s
            sparse = model.get_submodule(name)
            dense = ref.get_submodule(name)
            want_type = BalancedSparseConv1D if isinstance(dense, Conv1D) else BalancedSparseLinear
            assert type(sparse) is want_type
            assert (sparse.bank_size, sparse.k) == (bank, 4)
            # the sparse layer holds exactly the pruned dense weight; banks keep 4 of 16
            restored = sparse.to_dense().weight
            torch.testing.assert_close(restored, dense.weight, rtol=0, atol=0)
            matrix = dense.weight.t() if isinstance(dense, Conv1D) else dense.weight
            per_bank = (matrix != 0).reshape(matrix.shape[0], -1, bank).sum(-1)
            assert per_bank.max() <= 4
    # layers outside the blocks are untouched
    heads = {"bert": "classifier", "gpt2": "lm_head", "llama": "lm_head"}
    assert type(model.get_submodule(heads[arch])) is nn.Linear
    x = tokens()
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-4, atol=1e-5)


def test_short_last_bank_layer_converts():
    # intermediate 40 is not a multiple of the bank size 16: output.dense rows end in a
    # short bank of 8 columns that keeps round(4 * 8 / 16) = 2 weights
    model = tiny_bert(hidden=32, intermediate=40)
    ref = pruned_reference(model, 0.75, 16)
    prune_and_convert(model, 0.75, bank_size=16)
    layer = model.get_submodule("bert.encoder.layer.0.output.dense")
    assert layer.in_features == 40
    dense = ref.get_submodule("bert.encoder.layer.0.output.dense").weight
    assert int((dense[:, 32:] != 0).sum(-1).max()) == 2
    x = tokens()
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-4, atol=1e-5)


def test_convert_already_pruned_model_with_sparsity_none():
    model = tiny_bert()
    ref = pruned_reference(model, 0.5, 8)
    # a copy of the pruned weights carries no recorded plan: k is inferred from the zeros
    pruned = copy.deepcopy(ref)
    assert SparsityPlan.recorded(pruned) is None
    prune_and_convert(pruned, None, bank_size=8)
    layer = pruned.get_submodule("bert.encoder.layer.1.intermediate.dense")
    assert (layer.bank_size, layer.k) == (8, 4)
    x = tokens()
    torch.testing.assert_close(logits(pruned, x), logits(ref, x), rtol=1e-4, atol=1e-5)


def test_bfloat16_error_within_twice_dense_error():
    model = tiny_bert()
    ref32 = pruned_reference(model, 0.75, 16)
    dense16 = copy.deepcopy(ref32).to(torch.bfloat16)
    sparse16 = prune_and_convert(copy.deepcopy(model).to(torch.bfloat16), 0.75, bank_size=16)
    assert sparse16.get_submodule("bert.encoder.layer.0.output.dense").values.dtype == (
        torch.bfloat16
    )
    x = tokens()
    want = logits(ref32, x)
    dense_err = (logits(dense16, x).float() - want).abs().max()
    sparse_err = (logits(sparse16, x).float() - want).abs().max()
    assert sparse_err <= 2 * dense_err + 1e-3


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_save_load_round_trip(arch, tmp_path):
    model = prune_and_convert(BUILDERS[arch](), 0.75, bank_size=16)
    save_sparse(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", WEIGHTS_FILE, MARKER_FILE}
    marker = json.loads((tmp_path / MARKER_FILE).read_text())
    assert marker["model_class"] == type(model).__name__
    assert (marker["bank_size"], marker["k"]) == (16, 4)
    assert len(marker["sparse_layers"]) == sum(len(s) for s in [BLOCK_LAYERS[arch][1]]) * 2

    loaded = load_sparse(tmp_path)
    assert type(loaded) is type(model)
    assert not loaded.training
    for name, module in model.named_modules():
        if isinstance(module, BalancedSparseLinear):
            twin = loaded.get_submodule(name)
            assert type(twin) is type(module)
            assert torch.equal(twin.values, module.values)
            assert torch.equal(twin.indices, module.indices)
    x = tokens(seed=3)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)


def test_gpt2_tied_head_is_saved_once_and_retied(tmp_path):
    model = prune_and_convert(tiny_gpt2(), 0.5, bank_size=8)
    save_sparse(model, tmp_path)
    stored = load_file(tmp_path / WEIGHTS_FILE)
    assert "lm_head.weight" not in stored
    marker = json.loads((tmp_path / MARKER_FILE).read_text())
    assert marker["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = load_sparse(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_saved_folder_is_compact(tmp_path):
    model = tiny_bert(hidden=64, intermediate=256)
    dense_dir, sparse_dir = tmp_path / "dense", tmp_path / "sparse"
    model.save_pretrained(dense_dir)
    prune_and_convert(model, 0.875, bank_size=32)  # k = 4 of 32
    save_sparse(model, sparse_dir)
    dense_size = (dense_dir / "model.safetensors").stat().st_size
    sparse_size = (sparse_dir / WEIGHTS_FILE).stat().st_size
    # each converted [out, in] fp32 matrix shrinks from 4 * out * in bytes to
    # out * in / 32 * 4 * (4 + 1) bytes (fp32 values + uint8 indices) plus a 32-byte layout
    saved = 0
    for module in model.modules():
        if isinstance(module, BalancedSparseLinear):
            n = module.in_features * module.out_features
            saved += 4 * n - (n // 32 * 4 * 5 + 4 * 8)
    # the safetensors headers differ by a few hundred bytes per tensor name
    assert abs((dense_size - sparse_size) - saved) < 8192
    assert sparse_size < 0.45 * dense_size


class _AllocationProbe(TorchDispatchMode):
    """Records the largest size in bytes of any tensor an op creates off the meta device."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_load_never_materialises_dense_sparse_weights(tmp_path):
    # the intermediate layers (2048 x 32 fp32 weights, 256 KiB) are by far the largest
    # tensors; their compact values take a quarter of that
    model = prune_and_convert(tiny_bert(hidden=32, intermediate=2048), 0.75, bank_size=16)
    save_sparse(model, tmp_path)
    dense_bytes = 2048 * 32 * 4
    # the probe does see a dense build of the same model
    with _AllocationProbe() as probe:
        BertForSequenceClassification(model.config)
    assert probe.largest >= dense_bytes
    with _AllocationProbe() as probe:
        loaded = load_sparse(tmp_path)
    assert probe.largest < dense_bytes
    x = tokens()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)


# ---------------------------------------------------------------- errors


def test_not_a_pretrained_model():
    with pytest.raises(TypeError, match="must be a transformers.PreTrainedModel, got Sequential"):
        prune_and_convert(nn.Sequential(nn.Linear(4, 4)), 0.5)
    with pytest.raises(TypeError, match="must be a transformers.PreTrainedModel"):
        save_sparse(nn.Linear(4, 4), "unused")


@pytest.mark.parametrize(
    ("sparsity", "match"),
    [(1.0, r"sparsity.*must be in \[0, 1\)"), (-0.1, r"must be in \[0, 1\)"), ("x", "float")],
)
def test_bad_sparsity(sparsity, match):
    with pytest.raises(ValueError, match=match):
        prune_and_convert(tiny_bert(), sparsity, bank_size=16)


def test_sparsity_keeping_nothing_names_layer():
    with pytest.raises(ValueError, match=r"keeps round\(16 \* \(1 - 0.99\)\) = 0 weights"):
        prune_and_convert(tiny_bert(), 0.99, bank_size=16)


@pytest.mark.parametrize("bank_size", [0, 300, 2.5, True])
def test_bad_bank_size(bank_size):
    with pytest.raises(ValueError, match=r"bank_size must be .*\[1, 256\]"):
        prune_and_convert(tiny_bert(), 0.5, bank_size=bank_size)


def test_bank_longer_than_row_names_layer_and_changes_nothing():
    # bank 48: layer 0's output.dense (64 columns) fits and comes first, layer 1's
    # attention.output.dense (32 columns) does not; the error comes before any pruning
    model = tiny_bert(hidden=32, intermediate=64)
    before = copy.deepcopy(model.state_dict())
    include = ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.attention.output.dense"]
    with pytest.raises(
        ValueError, match="bank_size=48 for layer 'bert.encoder.layer.1.attention.output.dense'"
    ):
        prune_and_convert(model, 0.5, bank_size=48, include=include)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unconvertible_layer_names_it():
    model = tiny_bert()
    with pytest.raises(
        TypeError, match=r"cannot convert layer 'bert.embeddings.word_embeddings' of type Embedding"
    ):
        prune_and_convert(model, 0.5, bank_size=8, include="bert.embeddings.*")
    # nothing was pruned: the error comes before any weight changes
    assert type(model.get_submodule("bert.encoder.layer.0.output.dense")) is nn.Linear


def test_glob_matching_nothing():
    with pytest.raises(ValueError, match="include glob '\\*nope\\*' matches no module"):
        prune_and_convert(tiny_bert(), 0.5, bank_size=8, include="*nope*")
    with pytest.raises(ValueError, match="exclude glob 'nope' matches no module"):
        prune_and_convert(tiny_bert(), 0.5, bank_size=8, exclude="nope")
    with pytest.raises(ValueError, match="no layer of BertForSequenceClassification selected"):
        prune_and_convert(tiny_bert(), 0.5, bank_size=8, exclude="*")


def test_not_balanced_names_layer():
    # sparsity=None converts as is: a layer pruned without banks (unstructured, 50% of all
    # weights at random) has banks of uneven counts
    model = tiny_bert()
    query = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        query.weight.mul_(torch.rand(query.weight.shape, generator=gen) < 0.5)
    with pytest.raises(
        ValueError, match="'bert.encoder.layer.0.attention.self.query'.*not balanced"
    ):
        prune_and_convert(model, None, bank_size=8)


def test_sparsity_none_on_unpruned_model():
    with pytest.raises(ValueError, match="none of the 12 selected layers .* is pruned"):
        prune_and_convert(tiny_bert(), None, bank_size=8)


def test_sparsity_none_leaves_unpruned_layers_dense():
    model = tiny_bert()
    prune_balanced_(select_layers(model, include="*.intermediate.dense"), 0.5, 8)
    prune_and_convert(model, None, bank_size=8)
    assert type(model.get_submodule("bert.encoder.layer.0.intermediate.dense")) is (
        BalancedSparseLinear
    )
    assert type(model.get_submodule("bert.encoder.layer.0.output.dense")) is nn.Linear


def test_save_other_sparse_module_names_it():
    model = prune_and_convert(tiny_bert(), 0.5, bank_size=8)
    conv = nn.Conv2d(2, 8, 3)
    model.bert.extra = BalancedSparseConv2d.from_dense(conv, bank_size=9, sparsity=0.5)
    with pytest.raises(
        TypeError, match=r"cannot save sparse layers \['bert.extra \(BalancedSparseConv2d\)'\]"
    ):
        save_sparse(model, "unused")


def test_save_unconverted_model():
    with pytest.raises(ValueError, match="has no balanced sparse layer"):
        save_sparse(tiny_bert(), "unused")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{MARKER_FILE} not found"):
        load_sparse(tmp_path)
    save_sparse(prune_and_convert(tiny_bert(), 0.5, bank_size=8), tmp_path)
    marker_path = tmp_path / MARKER_FILE
    good = json.loads(marker_path.read_text())

    def write(**changes):
        marker_path.write_text(json.dumps({**good, **changes}))

    write(format_version=99)
    with pytest.raises(ValueError, match="version 99"):
        load_sparse(tmp_path)
    write(model_class="os")
    with pytest.raises(ValueError, match="model_class 'os'.*not a transformers PreTrainedModel"):
        load_sparse(tmp_path)
    layers = dict(good["sparse_layers"])
    name = "bert.encoder.layer.0.attention.self.query"
    write(sparse_layers={**layers, name: {**layers[name], "type": "Foo"}})
    with pytest.raises(ValueError, match=f"sparse layer '{name}'.*type 'Foo'"):
        load_sparse(tmp_path)
    write(sparse_layers={**layers, "bert.embeddings.word_embeddings": layers[name]})
    with pytest.raises(ValueError, match="replaces a Embedding"):
        load_sparse(tmp_path)
    write(sparse_layers={**layers, "bert.nope": layers[name]})
    with pytest.raises(ValueError, match="'bert.nope'.*does not exist"):
        load_sparse(tmp_path)
    # a marker that forgets a sparse layer: the weights file does not fit the dense layer
    del layers[name]
    write(sparse_layers=layers)
    with pytest.raises(ValueError, match="does not match BertForSequenceClassification"):
        load_sparse(tmp_path)
