"""Autograd of the balanced ops: gradients for `x`, the values and the bias; indices fixed.

For `y = x W^T + b` with `W` in the compact format (`docs/ARCHITECTURE.md` section 2), with
`grad [M, out]` the gradient of `y`:

- `dx = grad W` `[M, in]` (`balanced_linear_grad_input`),
- `dvalues[o, j] = sum_m grad[m, o] x[m, col(o, j)]` `[out, width]`
  (`balanced_linear_grad_values`), 0 on the padding entries of a short last bank (see
  `padding_entries`), so fine-tuning never grows the pattern,
- `dbias = sum_m grad[m]`.

On the CPU with the compiled library both products run C++ kernels (`M * nnz`
multiply-adds, no unpacking): `csrc/cpu/balanced_linear_backward_cpu.cpp` on the row-major
format, `csrc/cpu/balanced_linear_tiled_backward_cpu.cpp` on the tile layout (fp32, the
builds with the tile kernel); elsewhere (CUDA, the reference backend) the dense products on
the unpacked matrix.

`torch.library.register_autograd` gives the formulas to `balanced_linear` (row-major),
`balanced_linear_tiled` (its tile-layout gradient is the row-major one packed with
`ops.pack_tiles`) and `balanced_lstm_layer` (backward by recomputing the recurrence step by
step with `balanced_linear_tiled`, whose autograd then applies). Registration runs when the
library loads (`_build.on_load`).
"""

from __future__ import annotations

import torch

from bs_lightning import _build, ops
from bs_lightning.sparsity.masks import bank_layout, topk_mask_lastdim

__all__ = [
    "balanced_linear_grad_input",
    "balanced_linear_grad_values",
    "lstm_layer_reference",
    "padding_entries",
]


def _columns(indices: torch.Tensor, bank_size: int, in_features: int) -> torch.Tensor:
    """Column `(j // k) * bank_size + indices[o, j]` of every entry, int64 `[out, width]`."""
    width = indices.size(1)
    k = width // -(-in_features // bank_size)
    bank = torch.arange(width, device=indices.device) // k
    return bank * bank_size + indices.long()


def padding_entries(
    values: torch.Tensor, indices: torch.Tensor, bank_size: int, in_features: int
) -> torch.Tensor | None:
    """Which entries `[out, width]` are padding, or None when there is none.

    Padding exists only in a short last bank: it has `k` entries but keeps
    `k_last = bank_layout(in, B, k)[1]` weights. Its trainable entries are `k_last` of them,
    nonzeros first, then distinct columns, lower entries first; the rest are padding (value 0,
    never trained, so a fine-tuned layer keeps its pattern).
    """
    if in_features % bank_size == 0:
        return None
    width = values.size(1)
    k = width // -(-in_features // bank_size)
    k_last = bank_layout(in_features, bank_size, k)[1]
    last = slice(width - k, width)
    idx = indices[:, last].long()
    repeat = torch.zeros_like(idx, dtype=torch.bool)
    repeat[:, 1:] = idx[:, 1:] == idx[:, :-1]
    # 2 for a nonzero, 1 for a first occurrence: the k_last best stay trainable
    score = (values[:, last] != 0).long() * 2 + (~repeat).long()
    padding = torch.zeros_like(indices, dtype=torch.bool)
    padding[:, last] = ~topk_mask_lastdim(score.float(), k_last)
    return padding


def _compiled_backward(t: torch.Tensor) -> bool:
    return t.is_cpu and ops.backend("cpu") == "compiled-cpu"


def balanced_linear_grad_input(
    grad: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bank_size: int,
    in_features: int,
) -> torch.Tensor:
    """`grad W`: `grad [M, out]` -> `[M, in_features]` (the gradient of the product's input).

    Args:
        grad: `[M, out]`, the gradient of the product's output.
        values: `[out, n_banks * k]` in `grad.dtype`.
        indices: `[out, n_banks * k]` uint8.
        bank_size: columns per bank.
        in_features: columns of `W`.
    """
    if _compiled_backward(grad):
        return torch.ops.bs_lightning.balanced_linear_grad_input(
            grad, values, indices, bank_size, in_features
        )
    columns = _columns(indices, bank_size, in_features)
    weight = values.new_zeros(values.size(0), in_features).scatter_add_(1, columns, values)
    return grad @ weight


def balanced_linear_grad_values(
    grad: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    bank_size: int,
    in_features: int,
) -> torch.Tensor:
    """`dvalues[o, j] = sum_m grad[m, o] x[m, col(o, j)]` `[out, n_banks * k]`, padding included.

    Args:
        grad: `[M, out]`, the gradient of the product's output.
        x: `[M, in_features]`, the product's input.
        indices: `[out, n_banks * k]` uint8.
        bank_size: columns per bank.
        in_features: columns of `W`.
    """
    if _compiled_backward(grad):
        return torch.ops.bs_lightning.balanced_linear_grad_values(
            grad, x, indices, bank_size, in_features
        )
    return (grad.t() @ x).gather(1, _columns(indices, bank_size, in_features))


def _grads(ctx, grad, x, values, indices, need_x: bool, need_values: bool, need_bias: bool):
    """`(dx, dvalues, dbias)` of `y = x W^T + b` for `grad [..., out]`; None where not needed."""
    bank_size, in_features = ctx.bank_size, ctx.in_features
    grad2 = grad.reshape(-1, values.size(0))  # [M, out]
    dx = dvalues = dbias = None
    if need_x:
        dx = balanced_linear_grad_input(grad2, values, indices, bank_size, in_features)
        dx = dx.reshape(*grad.shape[:-1], in_features)
    if need_values:
        x2 = x.reshape(-1, in_features)
        dvalues = balanced_linear_grad_values(grad2, x2, indices, bank_size, in_features)
        padding = padding_entries(values, indices, bank_size, in_features)
        if padding is not None:
            dvalues = dvalues.masked_fill(padding, 0)
    if need_bias:
        dbias = grad2.sum(0)
    return dx, dvalues, dbias


def _linear_setup_context(ctx, inputs, output) -> None:
    x, values, indices, bank_size, in_features, bias = inputs
    ctx.save_for_backward(x, values, indices)
    ctx.bank_size, ctx.in_features, ctx.has_bias = bank_size, in_features, bias is not None


def _linear_backward(ctx, grad: torch.Tensor):
    x, values, indices = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dvalues, dbias = _grads(
        ctx, grad, x, values, indices, need[0], need[1], ctx.has_bias and need[5]
    )
    return dx, dvalues, None, None, None, dbias


def _tiled_setup_context(ctx, inputs, output) -> None:
    x, tile_values, tile_indices, bank_size, in_features, out_features, bias = inputs
    ctx.save_for_backward(x, tile_values, tile_indices)
    ctx.bank_size, ctx.in_features, ctx.out_features = bank_size, in_features, out_features
    ctx.has_bias = bias is not None


def _tiled_backward(ctx, grad: torch.Tensor):
    x, tile_values, tile_indices = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_bias = ctx.has_bias and need[6]
    if grad.dtype == torch.float32 and _compiled_backward(grad):
        if ops.cpu_tiles_supported(ctx.bank_size):
            return _tiled_grads(
                ctx, grad, x, tile_values, tile_indices, need[0], need[1], need_bias
            )
    values, indices = ops.unpack_tiles(tile_values, tile_indices, ctx.out_features)
    dx, dvalues, dbias = _grads(ctx, grad, x, values, indices, need[0], need[1], need_bias)
    dtiles = None if dvalues is None else ops.pack_tiles(dvalues, indices)[0]
    return dx, dtiles, None, None, None, None, dbias


def _tiled_grads(ctx, grad, x, tile_values, tile_indices, need_x, need_values, need_bias):
    """`_tiled_backward` on the tile layout itself: the C++ tile kernels, no unpacking."""
    bank_size, in_features, out_features = ctx.bank_size, ctx.in_features, ctx.out_features
    grad2 = grad.reshape(-1, out_features)
    dx = dtiles = dbias = None
    if need_x:
        dx = torch.ops.bs_lightning.balanced_linear_tiled_grad_input(
            grad2, tile_values, tile_indices, bank_size, in_features
        ).reshape(*grad.shape[:-1], in_features)
    if need_values:
        dtiles = torch.ops.bs_lightning.balanced_linear_tiled_grad_values(
            grad2, x.reshape(-1, in_features), tile_indices, bank_size, in_features
        )
        if in_features % bank_size:  # a short last bank: hold its padding entries at 0
            values, indices = ops.unpack_tiles(tile_values, tile_indices, out_features)
            padding = padding_entries(values, indices, bank_size, in_features)
            dtiles = dtiles.masked_fill(ops.pack_tiles(padding, indices)[0], 0)
    if need_bias:
        dbias = grad2.sum(0)
    return dx, dtiles, None, None, None, None, dbias


def lstm_layer_reference(
    gates_x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    tile_values: torch.Tensor,
    tile_indices: torch.Tensor,
    bank_size: int,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ops.balanced_lstm_layer` step by step in PyTorch ops (same arguments and results).

    Each step's `h W_hh^T` is one `balanced_linear_tiled` call, so autograd flows through it.
    """
    hidden = h0.size(-1)
    h, c = h0, c0
    steps = gates_x.size(0)
    outs: list[torch.Tensor] = [h0] * steps  # placeholders, every slot is overwritten
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        recurrent = ops.balanced_linear_tiled(
            h, tile_values, tile_indices, bank_size, hidden, 4 * hidden
        )
        i, f, g, o = (gates_x[t] + recurrent).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs[t] = h
    return torch.stack(outs), h, c


def _lstm_setup_context(ctx, inputs, output) -> None:
    gates_x, h0, c0, tile_values, tile_indices, bank_size, reverse = inputs
    ctx.save_for_backward(gates_x, h0, c0, tile_values, tile_indices)
    ctx.bank_size, ctx.reverse = bank_size, reverse


def _lstm_backward(ctx, grad_out, grad_h, grad_c):
    """Recomputes the recurrence with autograd (`lstm_layer_reference`) and backpropagates
    the three output gradients through it; activations are not kept by the forward."""
    gates_x, h0, c0, tile_values, tile_indices = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    leaves = [
        t.detach().requires_grad_(n)
        for t, n in zip((gates_x, h0, c0, tile_values), need, strict=True)
    ]
    with torch.enable_grad():
        outputs = lstm_layer_reference(*leaves, tile_indices, ctx.bank_size, ctx.reverse)
        wanted = [t for t in leaves if t.requires_grad]
        grads_out = [
            torch.zeros_like(o) if g is None else g
            for o, g in zip(outputs, (grad_out, grad_h, grad_c), strict=True)
        ]
        found = iter(torch.autograd.grad(outputs, wanted, grads_out, allow_unused=True))
    grads = [next(found) if t.requires_grad else None for t in leaves]
    return (*grads, None, None, None)


def _register() -> None:
    """Fakes of the backward ops and the autograd formulas (runs once the ops exist)."""

    @torch.library.register_fake("bs_lightning::balanced_linear_grad_input")
    def _(grad, values, indices, bank_size, in_features):
        return grad.new_empty(grad.size(0), in_features)

    @torch.library.register_fake("bs_lightning::balanced_linear_grad_values")
    def _(grad, x, indices, bank_size, in_features):
        return grad.new_empty(indices.shape)

    @torch.library.register_fake("bs_lightning::balanced_linear_tiled_grad_input")
    def _(grad, values, indices, bank_size, in_features):
        return grad.new_empty(grad.size(0), in_features)

    @torch.library.register_fake("bs_lightning::balanced_linear_tiled_grad_values")
    def _(grad, x, indices, bank_size, in_features):
        return grad.new_empty(indices.shape)

    torch.library.register_autograd(
        "bs_lightning::balanced_linear", _linear_backward, setup_context=_linear_setup_context
    )
    torch.library.register_autograd(
        "bs_lightning::balanced_linear_tiled",
        _tiled_backward,
        setup_context=_tiled_setup_context,
    )
    torch.library.register_autograd(
        "bs_lightning::balanced_lstm_layer", _lstm_backward, setup_context=_lstm_setup_context
    )


_build.on_load("register_autograd", _register)
