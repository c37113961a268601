"""Kernel-benchmark contenders for CUDA (bs_lightning/bench/cuda_contenders.py).

The rotation and path-forcing logic runs on the CPU here (the L2 size is faked); on a GPU
the same contenders run on the CUDA op.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bs_lightning.bench import cuda_contenders as cc
from bs_lightning.nn.format import pack_balanced
from bs_lightning.sparsity import balanced_mask


def test_rotate_cycles_through_calls():
    seen = []
    fn = cc.rotate([lambda i=i: seen.append(i) for i in range(3)])
    for _ in range(7):
        fn()
    assert seen == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("old", [None, "17"])
def test_forced_path_sets_and_restores_the_override(monkeypatch, old):
    if old is None:
        monkeypatch.delenv(cc.DENSE_MIN_BATCH_ENV, raising=False)
    else:
        monkeypatch.setenv(cc.DENSE_MIN_BATCH_ENV, old)
    fn = cc.forced_path(lambda: os.environ[cc.DENSE_MIN_BATCH_ENV], "1")
    assert fn() == "1"
    assert os.environ.get(cc.DENSE_MIN_BATCH_ENV) == old


def test_contenders_rotate_copies_and_compute_the_product(monkeypatch):
    """With a (faked) 1 MB L2: 2 MB must be cycled, so a 0.5 MB dense weight gets 4 copies."""
    l2 = SimpleNamespace(L2_cache_size=2**20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: l2)
    assert cc.l2_copies(torch.device("cpu"), 2**19, max_copies=20) == 4
    assert cc.l2_copies(torch.device("cpu"), 2**19, max_copies=3) == 3
    assert cc.l2_copies(torch.device("cpu"), 2**30, max_copies=20) == 1
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    w = w * balanced_mask(w, 0.75, 32)
    values, indices, _ = pack_balanced(w, 32)
    x = torch.randn(3, 512)
    fns = cc.cuda_contenders(x, w, values, indices, 32, w.to_sparse_csr(), max_copies=20)
    assert set(fns) == {"dense", "balanced", "balanced_gather", "balanced_unpack", "csr"}
    want = F.linear(x, w)
    for name, fn in fns.items():
        for _ in range(5):  # every copy computes the same product
            torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-4, msg=name)
