"""BalancedSparseConv2d against the masked nn.Conv2d."""

import io

import pytest
import torch
from torch import nn

from bs_lightning.nn import BalancedSparseConv2d
from bs_lightning.sparsity import balanced_mask

CONFIGS = [
    # (conv kwargs, bank, sparsity)
    (dict(in_channels=3, out_channels=8, kernel_size=3), 9, 0.75),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), 16, 0.9),
    (dict(in_channels=4, out_channels=8, kernel_size=(2, 3), padding="same", dilation=2), 8, 0.5),
    (dict(in_channels=6, out_channels=9, kernel_size=3, groups=3, padding=(1, 2)), 4, 0.5),
    (dict(in_channels=8, out_channels=8, kernel_size=3, groups=8, padding=1, bias=False), 9, 0.67),
    (
        dict(in_channels=4, out_channels=5, kernel_size=3, padding=2, padding_mode="reflect"),
        32,
        0.97,
    ),
    (dict(in_channels=2, out_channels=4, kernel_size=1, padding="valid"), 2, 0.5),
    (
        dict(
            in_channels=16,
            out_channels=12,
            kernel_size=4,
            stride=(1, 2),
            padding_mode="circular",
            padding=1,
        ),
        64,
        0.95,
    ),
]


def _pruned_conv(kwargs, bank, sparsity, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**kwargs)
    with torch.no_grad():
        conv.weight.mul_(balanced_mask(conv.weight, sparsity, bank))
    return conv


@pytest.mark.parametrize(("kwargs", "bank", "sparsity"), CONFIGS)
def test_matches_masked_conv(kwargs, bank, sparsity):
    conv = _pruned_conv(kwargs, bank, sparsity)
    sparse = BalancedSparseConv2d.from_dense(conv, bank)
    x = torch.randn(3, kwargs["in_channels"], 9, 11)
    torch.testing.assert_close(sparse(x), conv(x), rtol=1e-4, atol=1e-5)
    # unbatched input, and a non-contiguous (channels-last) input
    torch.testing.assert_close(sparse(x[1]), conv(x[1]), rtol=1e-4, atol=1e-5)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(sparse(x_cl), conv(x), rtol=1e-4, atol=1e-5)


def test_from_dense_with_sparsity_and_to_dense():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).eval()
    sparse = BalancedSparseConv2d.from_dense(conv, 9, sparsity=0.75)
    dense = sparse.to_dense()
    assert type(dense) is nn.Conv2d and not dense.training
    assert (dense.groups, dense.padding, dense.padding_mode) == (2, (1, 1), "zeros")
    expected = conv.weight * balanced_mask(conv.weight, 0.75, 9)
    assert torch.equal(dense.weight, expected)
    assert torch.equal(dense.bias, conv.bias)


def test_state_dict_round_trip_and_layout_error():
    conv = _pruned_conv(dict(in_channels=4, out_channels=6, kernel_size=3), 12, 0.75)
    sparse = BalancedSparseConv2d.from_dense(conv, 12)
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    rebuilt = BalancedSparseConv2d(4, 6, 3, bank_size=12, k=sparse.k)
    rebuilt.load_state_dict(state)
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(rebuilt(x), sparse(x))
    model = nn.Sequential(BalancedSparseConv2d(4, 6, 3, bank_size=36, k=9))
    with pytest.raises(
        RuntimeError, match=r"layer '0': layout .*\(6, 36, 12, 3\).*\(6, 36, 36, 9\)"
    ):
        model.load_state_dict({"0." + k: v for k, v in state.items()})


def test_from_dense_errors():
    with pytest.raises(TypeError, match="expects an nn.Conv2d, got Linear"):
        BalancedSparseConv2d.from_dense(nn.Linear(4, 4), 4)
    conv = nn.Conv2d(2, 4, 3)
    with torch.no_grad():
        conv.weight[:, :, 0, :] = 0  # the three banks of 6 hold 3, 3 and 6 nonzeros
    with pytest.raises(ValueError, match=r"layer 'stem'.*not balanced at bank_size=6"):
        BalancedSparseConv2d.from_dense(conv, 6, name="stem")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(groups=3), r"divisible by groups \(3\)"),
        (dict(padding_mode="mirror"), "padding_mode of BalancedSparseConv2d must be one of"),
        (
            dict(padding="full"),
            "padding of BalancedSparseConv2d must be an int, a pair, 'valid' or 'same'",
        ),
        (dict(padding="same", stride=2), "padding='same' of BalancedSparseConv2d needs stride 1"),
        (dict(bank_size=40), r"bank_size=40 .*longer than a row \(36 columns\)"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = dict(in_channels=4, out_channels=8, kernel_size=3, bank_size=4, k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BalancedSparseConv2d(**args)
