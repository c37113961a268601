"""Balanced cases and the accuracy rule of the CPU kernel tests (test_ops*.py).

Random cases draw a fresh seed every run (`fresh_seed`, printed in failure messages).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from bs_lightning.nn.format import pack_balanced
from bs_lightning.sparsity import balanced_mask, keep_count


def fresh_seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


def make_case(out, inn, bank_size, sparsity, dtype=torch.float32):
    """A balanced `[out, inn]` weight (masked dense) and its packed values/indices."""
    k = keep_count(bank_size, sparsity)
    weight = torch.randn(out, inn)
    weight = weight * balanced_mask(weight, sparsity, bank_size)
    values, indices, _ = pack_balanced(weight.to(dtype), bank_size, k)
    return weight.to(dtype), values, indices


def make_layer_case(out, inn, bank_size, sparsity, batch, dtype=torch.float32):
    """`make_case` plus a bias `[out]` and an input `[batch, inn]` in `dtype`.

    Returns:
        `(weight, values, indices, bias, x)`.
    """
    weight, values, indices = make_case(out, inn, bank_size, sparsity, dtype)
    bias = torch.randn(out).to(dtype)
    x = torch.randn(batch, inn).to(dtype)
    return weight, values, indices, bias, x


def assert_close_to_dense(y, x, weight, bias, seed, what=""):
    """Error vs an fp64 product at most twice plain PyTorch's error at x's precision."""
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    torch_err = (F.linear(x, weight, bias).double() - exact).abs().max().item()
    our_err = (y.double() - exact).abs().max().item()
    scale = exact.abs().max().item() + 1.0
    eps = torch.finfo(x.dtype).eps
    assert y.dtype == x.dtype and y.shape == exact.shape, (y.dtype, y.shape, what)
    assert our_err <= 2 * torch_err + 4 * eps * scale, (
        f"seed={seed} {what}: error {our_err:.3g} vs torch {torch_err:.3g}"
    )
