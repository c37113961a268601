"""`balanced_lstm_cell` everywhere: its schema is in the library, the CPU kernel is the PyTorch
reference, the fake gives shapes (the fused CUDA kernel is tested in test_cuda_lstm_cell.py)."""

import pytest
import torch
import torch.nn.functional as F

from bs_lightning import ops
from bs_lightning.nn.format import pack_balanced
from bs_lightning.sparsity import balanced_mask

if not ops.load():  # the op's schema comes with the compiled library
    pytest.skip("needs the compiled library", allow_module_level=True)
CELL = torch.ops.bs_lightning.balanced_lstm_cell


def _case(batch=3, hidden=32, bank=16, sparsity=0.75, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4 * hidden, hidden, generator=g)
    weight = weight * balanced_mask(weight, sparsity=sparsity, bank_size=bank)
    values, indices, _ = pack_balanced(weight, bank)
    gates_x = torch.randn(batch, 4 * hidden, generator=g)
    h, c = torch.randn(batch, hidden, generator=g), torch.randn(batch, hidden, generator=g)
    cast = [t.to(dtype) for t in (gates_x, h, c, values)]
    return (*cast[:3], cast[3], indices, bank), weight.to(dtype)


def test_cpu_kernel_is_one_lstm_step():
    args, weight = _case()
    gates_x, h, c = args[:3]
    i, f, g, o = (gates_x + F.linear(h, weight)).chunk(4, dim=-1)
    c_ref = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new, c_new = CELL(*args)
    torch.testing.assert_close(c_new, c_ref)
    torch.testing.assert_close(h_new, torch.sigmoid(o) * torch.tanh(c_ref))


def test_opcheck_and_fake():
    args, _ = _case(batch=2, hidden=16, bank=8)
    torch.library.opcheck(CELL, args, test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        h_new, c_new = CELL(*fake)
    assert h_new.shape == c_new.shape == (2, 16)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: (a[0], a[1][0], *a[2:]), ValueError, r"h must be 2-D \[batch, hidden\]"),
        (lambda a: (a[0][:, :-1], *a[1:]), ValueError, r"gates_x must have shape \[3, 128\]"),
        (lambda a: (a[0], a[1], a[2][:2], *a[3:]), ValueError, "c shape"),
        (lambda a: (a[0].double(), *a[1:]), TypeError, "c and gates_x must have h's dtype"),
        (lambda a: (*a[:3], a[3][:64], a[4][:64], a[5]), ValueError, "4 \\* hidden = 128 rows"),
    ],
)
def test_errors_name_the_argument(change, error, match):
    args, _ = _case()
    with pytest.raises(error, match=match):
        CELL(*change(args))
