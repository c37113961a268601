"""convert_to_sparse on small models: callback output, inferred layouts, strict/non-strict."""

import warnings

import pytest
import torch
from conftest import quiet_trainer, random_loader
from torch import nn
from transformers.pytorch_utils import Conv1D

from bs_lightning import BalancedPruningCallback, SparsityPlan, convert_to_sparse
from bs_lightning.nn import (
    BalancedSparseConv1D,
    BalancedSparseConv2d,
    BalancedSparseLinear,
    BalancedSparseLSTM,
    BalancedSparseMultiheadAttention,
    BalancedSparseTransformerEncoderLayer,
)
from bs_lightning.nn.lstm import lstm_weight_names
from bs_lightning.sparsity import (
    BalancedPattern,
    PlannedParam,
    balanced_mask,
    matrix_to_param,
    matrix_view,
)


class Mixed(nn.Module):
    """Conv2d -> LSTM -> GPT-2 Conv1D -> Linear -> dense head. Input `[B, 3, 4, 4]`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)  # rows of 27 columns
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True, bidirectional=True)
        self.proj = Conv1D(48, 64)
        self.fc = nn.Linear(48, 40)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # [B, 16, 16]
        h, _ = self.lstm(h)  # [B, 16, 64]
        return self.head(self.fc(self.proj(h.contiguous())))


# (bank, sparsity) per pruned layer: several bank sizes, one with a short last bank
PLAN = {"conv": (9, 0.75), "lstm": (16, 0.875), "proj": (32, 0.9), "fc": (12, 0.5)}


def _prune(model: nn.Module) -> tuple[nn.Module, SparsityPlan]:
    """Prunes `model` to `PLAN`; returns it with the plan of what was done."""
    entries = []
    with torch.no_grad():
        for layer, (bank, sparsity) in PLAN.items():
            module = getattr(model, layer)
            names = (
                lstm_weight_names(module.num_layers, module.bidirectional)
                if isinstance(module, nn.LSTM)
                else ["weight"]
            )
            for name in names:
                matrix = matrix_view(module, name)
                mask = balanced_mask(matrix, sparsity, bank)
                getattr(module, name).mul_(matrix_to_param(module, name, mask))
                k = round(bank * (1 - sparsity))
                shape = tuple(getattr(module, name).shape)
                entries.append(PlannedParam(layer, name, BalancedPattern(bank), sparsity, k, shape))
    return model, SparsityPlan(entries)


def _mixed():
    torch.manual_seed(0)
    model, plan = _prune(Mixed())
    return model.eval(), plan


def test_inferred_layouts_and_same_outputs():
    model, _ = _mixed()
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    assert convert_to_sparse(model) is model
    assert type(model.conv) is BalancedSparseConv2d
    assert type(model.lstm) is BalancedSparseLSTM
    assert type(model.proj) is BalancedSparseConv1D
    assert type(model.fc) is BalancedSparseLinear
    assert type(model.head) is nn.Linear  # dense layers stay dense
    assert (model.conv.bank_size, model.conv.k) == (9, 2)
    assert model.lstm._layouts["weight_hh_l1_reverse_"] == (128, 32, 16, 2)
    assert (model.proj.bank_size, model.proj.k) == (32, 3)
    assert (model.fc.bank_size, model.fc.k) == (12, 6)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_planned_layout_wins_over_inference():
    model, plan = _mixed()
    # a multiple of the bank size is also a valid plan: it must be used as planned
    fc = plan["fc.weight"]
    entries = [e for e in plan if e.name != "fc.weight"]
    plan = SparsityPlan(
        [*entries, PlannedParam("fc", "weight", BalancedPattern(24), 0.5, 12, fc.shape)]
    )
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    convert_to_sparse(model, plan=plan)
    assert (model.fc.bank_size, model.fc.k) == (24, 12)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_bank_size_override():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.mul_(balanced_mask(model[0].weight, 0.75, 8))
    convert_to_sparse(model, bank_size=16)
    assert (model[0].bank_size, model[0].k) == (16, 4)
    assert type(model[2]) is nn.Linear


def test_after_callback_fit(tiny_zoo):
    pruner = BalancedPruningCallback(sparsity=0.75, bank_size=8, frequency=2, end_step=4)
    quiet_trainer([pruner]).fit(tiny_zoo, random_loader())
    model = tiny_zoo.eval()
    x = torch.randn(3, 2, 6, 6)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pruned layer converts: no warning
        convert_to_sparse(model)
    assert type(model.conv) is BalancedSparseConv2d
    assert type(model.lstm) is BalancedSparseLSTM
    assert type(model.proj) is BalancedSparseConv1D
    assert type(model.head) is BalancedSparseLinear
    # the encoder layer leaves torch's fused path, which reads linear1.weight
    assert type(model.encoder) is BalancedSparseTransformerEncoderLayer
    assert type(model.encoder.linear1) is BalancedSparseLinear
    assert type(model.encoder.self_attn) is BalancedSparseMultiheadAttention
    assert type(model.encoder.self_attn.out_proj) is BalancedSparseLinear
    assert model.lstm._layouts["weight_ih_l1_reverse_"][2:] == (8, 2)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def _unstructured(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.fc.weight[torch.rand(model.fc.weight.shape, generator=g) < 0.9] = 0
    return model


def test_strict_raises_naming_the_layer():
    model = _unstructured(_mixed()[0])  # no plan: every layer is read from its zeros
    with pytest.raises(
        ValueError, match=r"layer 'fc' \(Linear\) cannot be converted: .*balanced at no bank size"
    ):
        convert_to_sparse(model)
    with pytest.raises(
        ValueError,
        match=r"layer 'fc' \(Linear\) cannot be converted: .*not balanced at bank_size=12",
    ):
        convert_to_sparse(nn.ModuleDict({"fc": model.fc}), bank_size=12)
    assert type(model.conv) is nn.Conv2d  # a failed strict conversion changes nothing


def test_weights_that_do_not_fit_the_plan_raise_naming_the_layer():
    model, plan = _mixed()
    with torch.no_grad():
        model.fc.weight.normal_()  # dense again: 12 nonzeros in banks planned to keep 6
    with pytest.raises(
        ValueError,
        match=r"layer 'fc' \(Linear\) does not match its sparsity plan \(weight: balanced "
        r"\(banks of 12\) keeping 6\): .*not balanced at bank_size=12, k=6: a bank holds 12",
    ):
        convert_to_sparse(model, plan=plan)
    assert type(model.conv) is nn.Conv2d
    wrong = SparsityPlan([PlannedParam("fc", "weight", BalancedPattern(12), 0.5, 6, (40, 64))])
    with pytest.raises(
        ValueError,
        match=r"layer 'fc': the sparsity plan prunes weight of shape \(40, 64\), "
        r"the model's has shape \(40, 48\)",
    ):
        convert_to_sparse(model, plan=wrong)
    with pytest.raises(ValueError, match=r"prunes modules \['nope'\] that Mixed does not have"):
        convert_to_sparse(
            model,
            plan=SparsityPlan(
                [PlannedParam("nope", "weight", BalancedPattern(12), 0.5, 6, (1, 1))]
            ),
        )


def test_non_strict_leaves_unbalanced_layer_dense():
    model = _unstructured(_mixed()[0])
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    convert_to_sparse(model, strict=False)
    assert type(model.fc) is nn.Linear
    assert type(model.conv) is BalancedSparseConv2d and type(model.proj) is BalancedSparseConv1D
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_dense_model_is_unchanged():
    torch.manual_seed(0)
    model = Mixed()
    modules = dict(model.named_modules())
    convert_to_sparse(model)
    assert dict(model.named_modules()) == modules


def test_root_layer_is_returned_converted():
    linear = nn.Linear(32, 8).half()
    with torch.no_grad():
        linear.weight.mul_(balanced_mask(linear.weight, 0.9, 32))
    sparse = convert_to_sparse(linear)
    assert type(sparse) is BalancedSparseLinear
    assert sparse.values.dtype == torch.float16 and (sparse.bank_size, sparse.k) == (32, 3)


def test_subclasses_stay_dense_and_attention_converts():
    class MyLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.ModuleDict({"mine": MyLinear(16, 16), "attn": nn.MultiheadAttention(16, 2)})
    with torch.no_grad():
        for weight in (model.mine.weight, model.attn.in_proj_weight, model.attn.out_proj.weight):
            weight.mul_(balanced_mask(weight, 0.5, 8))
    convert_to_sparse(model)
    assert type(model.mine) is MyLinear
    assert type(model.attn) is BalancedSparseMultiheadAttention
    assert (model.attn.out_proj.bank_size, model.attn.out_proj.k) == (8, 4)
