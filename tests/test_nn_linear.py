"""BalancedSparseLinear against the masked dense reference; state_dict; size; compile."""

import io
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bs_lightning import ops
from bs_lightning.nn import BalancedSparseLinear
from bs_lightning.sparsity import balanced_mask


def _pruned_linear(in_f, out_f, bank, sparsity, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.mul_(balanced_mask(linear.weight, sparsity, bank))
    return linear


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def test_hand_case():
    linear = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.0, 0, 3, 4, 0, 0, 7, 8]]))
    sparse = BalancedSparseLinear.from_dense(linear, 4)
    assert sparse.k == 2
    assert sparse.values.tolist() == [[3.0, 4.0, 7.0, 8.0]]
    x = torch.tensor([[1.0, 1, 1, 1, 2, 2, 2, 2]])
    assert sparse(x).tolist() == [[3.0 + 4 + 14 + 16]]


def test_random_cases_match_masked_dense():
    rng = random.Random()
    seed = rng.randrange(1 << 30)  # fresh cases each run; reported on failure
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for case in range(10):
        bank = rng.choice([4, 8, 16, 25, 32, 64, 100, 128, 256])
        in_f = rng.randint(bank, 2 * bank + 37)
        out_f = rng.randint(1, 150)
        sparsity = rng.uniform(0.5, min(0.97, 1 - 1 / bank))  # keeps >= 1 per bank
        bias = rng.random() < 0.5
        linear = _pruned_linear(in_f, out_f, bank, sparsity, bias, seed=seed + case)
        sparse = BalancedSparseLinear.from_dense(linear, bank)
        lead = rng.choice([(1,), (7,), (3, 5), (2, 1, 4)])
        x = torch.randn(*lead, in_f)
        msg = f"seed={seed} case={case} bank={bank} in={in_f} out={out_f} s={sparsity:.3f}"
        expected = F.linear(x, linear.weight, linear.bias)
        torch.testing.assert_close(sparse(x), expected, rtol=1e-4, atol=1e-4, msg=msg)
        # non-contiguous input: a transposed view and a strided slice
        xt = torch.randn(in_f, 6).t()
        torch.testing.assert_close(
            sparse(xt), F.linear(xt, linear.weight, linear.bias), rtol=1e-4, atol=1e-4, msg=msg
        )
        xs = torch.randn(4, 2 * in_f)[:, ::2]
        torch.testing.assert_close(
            sparse(xs), F.linear(xs, linear.weight, linear.bias), rtol=1e-4, atol=1e-4, msg=msg
        )


@pytest.mark.parametrize("batch", [1, 64, 4096])
def test_batch_sizes(batch):
    linear = _pruned_linear(96, 40, 32, 0.9)
    sparse = BalancedSparseLinear.from_dense(linear, 32)
    x = torch.randn(batch, 96)
    torch.testing.assert_close(sparse(x), linear(x), rtol=1e-4, atol=1e-4)


def test_from_dense_with_sparsity_prunes_one_shot():
    torch.manual_seed(0)
    linear = nn.Linear(64, 20)
    sparse = BalancedSparseLinear.from_dense(linear, 16, sparsity=0.75)
    assert (sparse.bank_size, sparse.k) == (16, 4)
    expected = linear.weight * balanced_mask(linear.weight, 0.75, 16)
    assert torch.equal(sparse.to_dense().weight, expected)
    x = torch.randn(5, 64)
    torch.testing.assert_close(sparse(x), F.linear(x, expected, linear.bias))


def test_to_dense_is_the_plain_linear():
    linear = _pruned_linear(50, 12, 8, 0.75).eval()
    dense = BalancedSparseLinear.from_dense(linear, 8).to_dense()
    assert type(dense) is nn.Linear and not dense.training
    assert torch.equal(dense.weight, linear.weight) and torch.equal(dense.bias, linear.bias)
    no_bias = BalancedSparseLinear.from_dense(_pruned_linear(50, 12, 8, 0.75, bias=False), 8)
    assert no_bias.to_dense().bias is None


def test_fresh_module_computes_zero_weights():
    sparse = BalancedSparseLinear(40, 6, bank_size=8, k=2)
    assert torch.equal(sparse(torch.randn(3, 40)), torch.zeros(3, 6))
    assert sparse.values.dtype == torch.float32 and sparse.indices.dtype == torch.uint8


def test_state_dict_round_trip_is_exact():
    linear = _pruned_linear(200, 33, 32, 0.9)
    sparse = BalancedSparseLinear.from_dense(linear, 32)
    assert set(sparse.state_dict()) == {"values", "indices", "layout", "bias"}
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = BalancedSparseLinear(200, 33, bank_size=32, k=sparse.k)
    rebuilt.load_state_dict(torch.load(buffer))
    for key, value in sparse.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    x = torch.randn(4, 200)
    assert torch.equal(rebuilt(x), sparse(x))


def test_load_wrong_bank_size_raises_naming_layer():
    sparse = BalancedSparseLinear.from_dense(_pruned_linear(64, 8, 16, 0.75), 16)  # k=4
    # bank 32, k=8 has the very same values shape [8, 8]: only the layout tells them apart
    model = nn.ModuleDict({"fc": BalancedSparseLinear(64, 8, bank_size=32, k=8)})
    before = model.fc.values.clone()
    with pytest.raises(
        RuntimeError, match=r"layer 'fc': layout .* = \(8, 64, 16, 4\).*\(8, 64, 32, 8\)"
    ):
        model.load_state_dict({"fc." + k: v for k, v in sparse.state_dict().items()})
    assert torch.equal(model.fc.values, before)  # nothing was copied


def test_load_wrong_shape_raises_naming_layer():
    sparse = BalancedSparseLinear.from_dense(_pruned_linear(64, 8, 16, 0.75), 16)
    model = nn.ModuleDict({"fc": BalancedSparseLinear(64, 9, bank_size=16, k=4)})
    with pytest.raises(RuntimeError, match=r"layer 'fc': layout .* = \(8, 64, 16, 4\)"):
        model.load_state_dict({"fc." + k: v for k, v in sparse.state_dict().items()})


def test_fp16_state_dict_at_90_percent_is_at_most_0_16_of_dense():
    linear = _pruned_linear(1024, 1024, 32, 0.9, dtype=torch.float16)
    dense_bytes = _state_bytes(linear)
    sparse = BalancedSparseLinear.from_dense(linear, 32)
    assert sparse.values.dtype == torch.float16
    ratio = _state_bytes(sparse) / dense_bytes
    assert ratio <= 0.16, ratio


def test_from_dense_unbalanced_raises():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight[torch.rand(16, 64) < 0.9] = 0
    with pytest.raises(ValueError, match=r"layer 'enc.fc'.*not balanced at bank_size=16"):
        BalancedSparseLinear.from_dense(linear, 16, name="enc.fc")


def test_from_dense_bad_arguments_raise():
    linear = nn.Linear(64, 16)
    with pytest.raises(TypeError, match="expects an nn.Linear, got Conv2d"):
        BalancedSparseLinear.from_dense(nn.Conv2d(2, 2, 1), 16)
    with pytest.raises(ValueError, match="give sparsity or k"):
        BalancedSparseLinear.from_dense(linear, 16, 0.5, k=2)
    with pytest.raises(ValueError, match=r"bank_size .*must be an integer in \[1, 256\]"):
        BalancedSparseLinear.from_dense(nn.Linear(600, 4), 512, 0.5)
    with pytest.raises(ValueError, match=r"sparsity.* must be in \[0, 1\)"):
        BalancedSparseLinear.from_dense(linear, 16, 1.5)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((64, 8, 0, 1), r"bank_size .*must be an integer in \[1, 256\]"),
        ((64, 8, 300, 1), r"bank_size .*must be an integer in \[1, 256\]"),
        ((64, 8, 128, 1), r"bank_size=128 .*longer than a row \(64 columns\)"),
        ((64, 8, 16, 17), r"k .*must be an integer in \[1, 16\]"),
        ((64, 0, 16, 2), r"out_features of BalancedSparseLinear weight must be an integer >= 1"),
    ],
)
def test_constructor_errors(args, match):
    with pytest.raises(ValueError, match=match):
        BalancedSparseLinear(*args)


def test_torch_compile_fullgraph():
    ops.load()
    if ops.backend("cpu") == "reference":
        pytest.skip(
            "compiled op not in use (not built or forced off): the reference reads index data"
        )
    linear = _pruned_linear(128, 48, 32, 0.875)
    sparse = BalancedSparseLinear.from_dense(linear, 32).eval()
    compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 128)
    torch.testing.assert_close(compiled(x), linear(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_pytorch(dtype):
    # flash-attention's rule: against an fp32 reference, the sparse layer's error is at most
    # about twice that of PyTorch's own F.linear at the same precision
    linear = _pruned_linear(512, 96, 32, 0.875, dtype=dtype)
    sparse = BalancedSparseLinear.from_dense(linear, 32)
    assert sparse.values.dtype == dtype
    x = torch.randn(9, 512).to(dtype)
    exact = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    err_sparse = (sparse(x).float() - exact).abs().max()
    err_torch = (linear(x).float() - exact).abs().max()
    assert sparse(x).dtype == dtype
    assert err_sparse <= 2 * err_torch + 1e-3, (err_sparse, err_torch)
