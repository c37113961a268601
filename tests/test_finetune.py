"""Converted models fine-tune in their compact form: values and biases are parameters,
gradients reach every layer, the pattern stays fixed, under Lightning and DDP."""

import copy

import torch
from conftest import TinyZoo, quiet_trainer, random_loader
from lightning.pytorch import Callback, Trainer
from torch import nn

from bs_lightning import convert_to_sparse, ops_backward
from bs_lightning.nn import BalancedSparseLinear, BalancedSparseLSTM
from bs_lightning.nn.base import BalancedSparseModule
from bs_lightning.nn.format import unpack_balanced
from bs_lightning.sparsity import BalancedPattern, find_prunable
from bs_lightning.sparsity.oneshot import prune_once_


def _pruned_zoo(seed: int = 0) -> TinyZoo:
    torch.manual_seed(seed)
    model = TinyZoo(lr=0.05, optimizer="sgd")
    with torch.no_grad():
        prune_once_(find_prunable(model), BalancedPattern(8), 0.75)
    return model


def _compact(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("indices")}


def _padding_values(model: nn.Module) -> list[torch.Tensor]:
    """Values of every padding entry (short last banks) of the sparse layers."""
    found = []
    for module in model.modules():
        if isinstance(module, BalancedSparseModule):
            for prefix, (_, in_features, bank_size, _) in module._layouts.items():
                values = getattr(module, prefix + "values")
                indices = getattr(module, prefix + "indices")
                pad = ops_backward.padding_entries(values, indices, bank_size, in_features)
                if pad is not None:
                    found.append(values.detach()[pad])
    return found


def test_values_and_biases_are_parameters_and_the_state_dict_keys_stay():
    dense = nn.Linear(32, 8)
    sparse = BalancedSparseLinear.from_dense(dense, 8, sparsity=0.5)
    assert dict(sparse.named_parameters()).keys() == {"values", "bias"}
    assert set(sparse.state_dict()) == {"values", "indices", "layout", "bias"}
    assert sparse.values.requires_grad and sparse.indices.dtype == torch.uint8
    frozen = nn.Linear(32, 8).requires_grad_(False)
    assert not BalancedSparseLinear.from_dense(frozen, 8, sparsity=0.5).values.requires_grad
    lstm = BalancedSparseLSTM.from_dense(nn.LSTM(16, 16), 8, sparsity=0.5)
    assert {n for n, _ in lstm.named_parameters()} == {
        "weight_ih_l0_values",
        "weight_hh_l0_values",
        "bias_l0",
    }


def test_converted_zoo_gradients_equal_the_masked_dense_ones():
    """Three SGD steps on the converted model equal three on the dense pruned model whose
    gradients are masked to the pattern: every layer's input and value gradients agree."""
    dense = _pruned_zoo()
    for name, p in dense.lstm.named_parameters():
        p.requires_grad_(not name.startswith("bias"))  # nn.LSTM has two biases, we fold them
    masks = {p: (p != 0).float() for p in dense.parameters() if p.dim() > 1}
    sparse = copy.deepcopy(dense)
    convert_to_sparse(sparse)
    for name, p in sparse.lstm.named_parameters():
        p.requires_grad_(not name.startswith("bias"))
    assert isinstance(sparse.lstm, BalancedSparseLSTM)
    x, y = next(iter(random_loader(n=8)))
    dense.train(), sparse.train()
    opts = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        for m in (dense, sparse)
    ]
    for _ in range(3):
        grads_x = []
        for model, opt in zip((dense, sparse), opts, strict=True):
            opt.zero_grad()
            xin = x.clone().requires_grad_(True)
            nn.functional.cross_entropy(model(xin), y).backward()
            grads_x.append(xin.grad)
            if model is dense:
                for p, mask in masks.items():
                    if p.grad is not None:
                        p.grad.mul_(mask)
            opt.step()
        torch.testing.assert_close(grads_x[1], grads_x[0], rtol=1e-4, atol=1e-6)
    dense.eval(), sparse.eval()
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-5)
    head = unpack_balanced(sparse.head.values.detach(), sparse.head.indices, 8, 16)
    torch.testing.assert_close(head, dense.head.weight.detach(), rtol=1e-4, atol=1e-6)


def test_converted_model_fine_tunes_under_lightning_and_keeps_its_pattern():
    model = _pruned_zoo()
    convert_to_sparse(model)
    indices = _compact(model)
    values = copy.deepcopy(model.head.values.detach())
    loader = random_loader(n=32)
    x, y = next(iter(loader))
    before = nn.functional.cross_entropy(model.eval()(x), y).item()
    quiet_trainer([], max_epochs=8).fit(model, loader)
    after = nn.functional.cross_entropy(model.eval()(x), y).item()
    assert after < before
    assert not torch.equal(model.head.values.detach(), values)
    for key, tensor in _compact(model).items():
        assert torch.equal(tensor, indices[key]), key
    assert all(bool((v == 0).all()) for v in _padding_values(model))
    assert _padding_values(model), "the conv rows end in a short bank"


def test_converted_model_under_torch_compile_has_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    with torch.no_grad():
        prune_once_(find_prunable(model), BalancedPattern(16), 0.75)
    sparse = copy.deepcopy(model)
    convert_to_sparse(sparse)
    x = torch.randn(5, 32, requires_grad=True)
    compiled = torch.compile(sparse, fullgraph=True)
    compiled(x).square().sum().backward()
    eager_x = x.detach().clone().requires_grad_(True)
    model(eager_x).square().sum().backward()
    torch.testing.assert_close(x.grad, eager_x.grad, rtol=1e-4, atol=1e-5)
    dense_grad = model[2].weight.grad * (model[2].weight != 0)
    got = unpack_balanced(sparse[2].values.grad, sparse[2].indices, 16, 64)
    torch.testing.assert_close(got, dense_grad, rtol=1e-4, atol=1e-5)


class _DumpValues(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, f"{self.out_dir}/rank{trainer.global_rank}.pt")


def test_converted_model_fine_tunes_under_ddp(tmp_path):
    model = _pruned_zoo()
    convert_to_sparse(model)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        callbacks=[_DumpValues(str(tmp_path))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, random_loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][key]), key  # the ranks stay in sync
        if key.endswith(("indices", "layout")):
            assert torch.equal(tensor, start[key]), key
    assert not torch.equal(ranks[0]["head.values"], start["head.values"])
