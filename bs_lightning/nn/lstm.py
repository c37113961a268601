"""`BalancedSparseLSTM`: `nn.LSTM` inference with balanced-sparse `W_ih` and `W_hh`.

Per layer and direction: the input projection of the whole sequence is one balanced product
(`[T * B, in] -> [T * B, 4H]`, with the folded bias `b_ih + b_hh`), then the recurrence:

- CPU, fp32, tile kernel: the whole recurrence in one compiled call (`balanced_lstm_layer`),
  unless PyTorch's dense LSTM on the dense copies was measured faster for inputs of this
  size (`measured_dispatch`; small matrices with large banks on CPUs with slow permutes).
- CUDA kernels loaded, eager inference, fp32/fp16/bf16, batch below the CUDA dense
  crossover: each time step is one fused `balanced_lstm_cell` (recurrent product, gates and
  state update in one kernel launch).
- Otherwise each step is one balanced product of `h` with all four gates of `W_hh [4H, H]`,
  then the gate arithmetic in PyTorch ops (also the autograd and `torch.compile` path).

The step loop has no host syncs and no data-dependent Python branches, so it can be captured
in a CUDA graph (`bs_lightning.nn.cuda_graph.CudaGraphRunner`): batch-1 generation then costs
one graph launch per sequence instead of one launch per step and layer.
Gate order is PyTorch's: input, forget, cell, output.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from bs_lightning import ops
from bs_lightning.nn.base import (
    MEASURE_REPEATS,
    BalancedSparseModule,
    _best_times,
    prune_and_pack,
)

__all__ = ["BalancedSparseLSTM", "lstm_weight_names"]

# the dtypes the fused CUDA step (csrc/cuda/lstm_cell_cuda.cu) is built for
_CELL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused_step_available(h: torch.Tensor) -> bool:
    """Whether the compiled CUDA `balanced_lstm_cell` kernel serves `h`'s device (the op's
    CPU kernel is the PyTorch reference, slower than the step loop's own products)."""
    return h.is_cuda and ops.backend(h.device) == "compiled-cuda"


def lstm_weight_names(num_layers: int, bidirectional: bool) -> list[str]:
    """Names of the `nn.LSTM` weight matrices, e.g. `weight_ih_l0`, `weight_hh_l1_reverse`."""
    suffixes = ["", "_reverse"] if bidirectional else [""]
    return [
        f"weight_{kind}_l{layer}{sfx}"
        for layer in range(num_layers)
        for sfx in suffixes
        for kind in ("ih", "hh")
    ]


def _per_matrix(value, weight_name: str, what: str, valid: list[str]) -> int:
    """`value` itself, or `value[weight_name]` when it is a mapping per weight matrix."""
    if isinstance(value, Mapping):
        if weight_name not in value:
            raise ValueError(
                f"{what} of BalancedSparseLSTM has no entry for {weight_name!r}; a mapping "
                f"needs every weight matrix: {valid}"
            )
        return value[weight_name]
    return value


class BalancedSparseLSTM(BalancedSparseModule):
    """Multi-layer, optionally bidirectional LSTM with balanced-sparse weight matrices.

    Per weight matrix `w` (names as `nn.LSTM`, e.g. `weight_ih_l0`, `weight_hh_l1_reverse`):
    the parameter `{w}_values` and the buffers `{w}_indices`, `{w}_layout`; per layer and
    direction the folded bias parameter `bias_l{layer}{_reverse}` `[4H]` (`b_ih + b_hh`) when
    `bias=True`. No projection (`proj_size`) support.

    Args:
        input_size: features of the input.
        hidden_size: `H`.
        bank_size: columns per bank, one int for every matrix or a mapping from weight name
            to int (an input smaller than the hidden size may need a smaller bank).
        k: weights kept per full bank, an int or a mapping like `bank_size`.
        num_layers: stacked layers.
        bias: whether the LSTM has biases.
        batch_first: input and output are `[B, T, F]` instead of `[T, B, F]`.
        dropout: dropout between layers in training mode, as `nn.LSTM`.
        bidirectional: run a reverse direction too; outputs are concatenated.
        device: device of the buffers.
        dtype: floating dtype of values and biases.

    Raises:
        ValueError: when a size, `bank_size` or `k` is out of range, or a mapping misses a
            weight matrix.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bank_size: int | Mapping[str, int],
        k: int | Mapping[str, int],
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for field, value in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{field} of BalancedSparseLSTM must be an int >= 1, got {value!r}"
                )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout of BalancedSparseLSTM must be in [0, 1], got {dropout!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.has_bias = bias
        self.bank_size = bank_size
        self.k = k
        names = lstm_weight_names(num_layers, bidirectional)
        directions = 2 if bidirectional else 1
        for name in names:
            layer = int(name.split("_l")[1].split("_")[0])
            if name.startswith("weight_ih"):
                in_features = input_size if layer == 0 else hidden_size * directions
            else:
                in_features = hidden_size
            self._register_compact(
                name + "_",
                4 * hidden_size,
                in_features,
                _per_matrix(bank_size, name, "bank_size", names),
                _per_matrix(k, name, "k", names),
                device,
                dtype,
            )
            if bias and name.startswith("weight_ih"):
                self.register_parameter(
                    "bias" + name[len("weight_ih") :],
                    nn.Parameter(torch.zeros(4 * hidden_size, device=device, dtype=dtype)),
                )

    def _direction(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, suffix: str):
        """Runs one layer in one direction. `x [T, B, in]`, `h`/`c [B, H]`.

        Returns:
            `(out [T, B, H], h_T [B, H], c_T [B, H])`.
        """
        bias = getattr(self, "bias" + suffix) if self.has_bias else None
        if self._dense_layer_wins(suffix, x, h, c, bias):
            return self._dense_direction(suffix, x, h, c, bias)
        return self._sparse_direction(suffix, x, h, c, bias)

    def _sparse_direction(self, suffix: str, x, h, c, bias):
        """`_direction` on the compact matrices."""
        gates_x = self._product("weight_ih" + suffix + "_", x, bias)  # [T, B, 4H], one call
        reverse = suffix.endswith("_reverse")
        hh = "weight_hh" + suffix + "_"
        tiles = self._cpu_tiles(hh, h) if h.dtype == torch.float32 else None
        if tiles is not None:  # the whole recurrence in one compiled call
            return ops.balanced_lstm_layer(gates_x, h, c, *tiles, self._layouts[hh][2], reverse)
        steps = x.shape[0]
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        outs: list[torch.Tensor] = [x] * steps  # placeholders, every slot is overwritten
        cell = self._fused_cell(hh, gates_x, h, c)
        if cell is not None:  # one kernel per step: product, gates and state update
            for t in order:
                h, c = torch.ops.bs_lightning.balanced_lstm_cell(gates_x[t], h, c, *cell)
                outs[t] = h
            return torch.stack(outs), h, c
        for t in order:
            gates = gates_x[t] + self._product(hh, h, None)  # [B, 4H]
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs[t] = h
        return torch.stack(outs), h, c

    def _dense_direction(self, suffix: str, x, h, c, bias):
        """`_direction` by PyTorch's own LSTM (oneDNN on the CPU) on the cached dense copies
        of `W_ih` and `W_hh`; the reverse direction runs on the time-flipped sequence."""
        weights = [self._dense_buffer("weight_ih" + suffix + "_")]
        weights.append(self._dense_buffer("weight_hh" + suffix + "_"))
        if bias is not None:
            weights += [bias, torch.zeros_like(bias)]  # the folded bias is b_ih + b_hh
        reverse = suffix.endswith("_reverse")
        seq = x.flip(0) if reverse else x
        out, h_n, c_n = torch.lstm(
            seq, (h[None], c[None]), weights, bias is not None, 1, 0.0, False, False, False
        )
        return (out.flip(0) if reverse else out), h_n[0], c_n[0]

    def _dense_layer_wins(self, suffix: str, x, h, c, bias) -> bool:
        """Whether PyTorch's dense LSTM runs this layer and direction faster than the sparse
        path (`balanced_lstm_layer`, or the step loop where the tile kernel does not run),
        for inputs of the size class of `x [T, B, in]` (power-of-two `T` and `B`): timed
        once on the input itself (`measured_dispatch`, both ways in turns) and cached.
        Only eager CPU inference with `dense_fallback` is measured; elsewhere, and by the
        rule, the sparse path runs. The dense copies are dropped again when it wins.
        """
        hh = "weight_hh" + suffix + "_"
        ih_values = self._parameters["weight_ih" + suffix + "_values"]
        values = self._parameters[hh + "values"]
        if not (self.dense_fallback and self.measured_dispatch and h.is_cpu):
            return False
        if torch.compiler.is_compiling() or not x.dtype == h.dtype == values.dtype:
            return False  # compiled code keeps the eager kernels; mixed dtypes raise there
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, h, c, bias, values, ih_values)
        ):
            return False
        steps, batch = x.shape[0], x.shape[1]
        choice_key = ((hh, None, "lstm"), (steps.bit_length(), batch.bit_length()))
        choice = self._dispatch.get(choice_key)
        if choice is None:
            calls = {
                "sparse": lambda: self._sparse_direction(suffix, x, h, c, bias),
                "dense": lambda: self._dense_direction(suffix, x, h, c, bias),
            }
            best = _best_times(calls, x.device, MEASURE_REPEATS)
            choice = self._dispatch[choice_key] = best["dense"] < best["sparse"]
            if not choice:
                for prefix in ("weight_ih" + suffix + "_", hh):
                    self._drop_unused_dense(prefix)
        return choice

    def _dispatch_uses_dense(self, prefix: str) -> bool:
        # the dense recurrence of a layer and direction reads the dense copy of `W_ih` too
        hh = prefix.replace("weight_ih", "weight_hh")
        return super()._dispatch_uses_dense(prefix) or any(
            dense and key == (hh, None, "lstm") for (key, _), dense in self._dispatch.items()
        )

    def _fused_cell(self, prefix: str, gates_x, h: torch.Tensor, c: torch.Tensor):
        """`(values, indices, bank_size)` of recurrent matrix `prefix` when the fused CUDA
        step `balanced_lstm_cell` runs this recurrence (`gates_x [T, B, 4H]`, states
        `h`/`c [B, H]`), else None.

        It runs on CUDA with the compiled CUDA kernels, in inference (nothing records
        gradients, not traced by `torch.compile`), for the dtypes the kernel has, while the
        recurrent product would run the sparse kernel: from the CUDA dense crossover on
        (`_cuda_dense_wins`) the dense copy and PyTorch's gate ops are faster.
        """
        values = self._parameters[prefix + "values"]
        if h.dtype != values.dtype or h.dtype not in _CELL_DTYPES:
            return None
        if torch.compiler.is_compiling() or not _fused_step_available(h):
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in (values, gates_x, h, c)):
            return None  # the fused step has no backward
        bank_size = self._layouts[prefix][2]
        indices = self._buffers[prefix + "indices"]
        if self.dense_fallback and self._cuda_dense_wins((prefix, None), h, None, values, indices):
            return None
        return values, indices, bank_size

    def forward(self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Same contract as `nn.LSTM.forward` (without `PackedSequence`).

        Args:
            input: `[T, B, input_size]` (`[B, T, input_size]` when `batch_first`) or
                unbatched `[T, input_size]`.
            hx: optional `(h0, c0)`, each `[num_layers * D, B, H]` (`[num_layers * D, H]`
                unbatched), `D = 2` when bidirectional; zeros when None.

        Returns:
            `(output, (h_n, c_n))`: `output [T, B, D * H]` (batch-first when set),
            `h_n`/`c_n` shaped like `h0`.

        Raises:
            TypeError: when `input` is a `PackedSequence`.
            ValueError: when `input` or `hx` has the wrong shape.
        """
        if isinstance(input, PackedSequence):
            raise TypeError("BalancedSparseLSTM does not take a PackedSequence; pad the batch")
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"input of BalancedSparseLSTM must be [T, B, {self.input_size}] (batch_first: "
                f"[B, T, {self.input_size}]) or [T, {self.input_size}], got {tuple(input.shape)}"
            )
        unbatched = input.dim() == 2
        if unbatched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input  # [T, B, in]
        directions = 2 if self.bidirectional else 1
        state_shape = (self.num_layers * directions, x.shape[1], self.hidden_size)
        if hx is None:
            h0 = c0 = x.new_zeros(state_shape)
        else:
            h0, c0 = (s.unsqueeze(1) if unbatched else s for s in hx)
            if h0.shape != state_shape or c0.shape != state_shape:
                raise ValueError(
                    f"hx of BalancedSparseLSTM must be two tensors of shape {state_shape} "
                    f"(unbatched: without the batch dim), got {tuple(hx[0].shape)} and "
                    f"{tuple(hx[1].shape)}"
                )
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(["", "_reverse"][:directions]):
                idx = layer * directions + d
                out, h, c = self._direction(x, h0[idx], c0[idx], f"_l{layer}{sfx}")
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=-1) if directions == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if unbatched:
            return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), (h_n, c_n)

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        bank_size: int | Mapping[str, int],
        sparsity: float | None = None,
        *,
        k: int | Mapping[str, int] | None = None,
        name: str | None = None,
    ) -> BalancedSparseLSTM:
        """Converts an `nn.LSTM`, pruning every weight matrix one-shot when `sparsity` is given.

        Args:
            module: the dense `nn.LSTM` (no `proj_size`).
            bank_size: columns per bank, an int or a mapping from weight name to int.
            sparsity: target sparsity in [0, 1) for a one-shot prune (`prune_matrix`) of each
                matrix; None requires already balanced weights.
            k: keep-count(s) when known (int or mapping); None infers them from the zeros.
                Not together with `sparsity`.
            name: layer name used in error messages.

        Returns:
            The sparse module on the weights' device and dtype.

        Raises:
            TypeError: when `module` is not an `nn.LSTM`.
            ValueError: `proj_size > 0`, bad `bank_size`/`sparsity`/`k`, a mapping misses a
                matrix, or a weight is not balanced.
        """
        if not isinstance(module, nn.LSTM):
            raise TypeError(
                f"BalancedSparseLSTM.from_dense expects an nn.LSTM, got {type(module).__name__}"
            )
        if module.proj_size:
            raise ValueError(
                f"LSTM{'' if name is None else f' {name!r}'} has proj_size="
                f"{module.proj_size}; BalancedSparseLSTM supports proj_size=0 only"
            )
        names = lstm_weight_names(module.num_layers, module.bidirectional)
        packed, banks, keeps = {}, {}, {}
        for w in names:
            where = w if name is None else f"{name}.{w}"
            banks[w] = _per_matrix(bank_size, w, "bank_size", names)
            k_w = None if k is None else _per_matrix(k, w, "k", names)
            values, indices, keeps[w] = prune_and_pack(
                getattr(module, w).detach(), banks[w], sparsity, k_w, where
            )
            packed[w] = (values, indices)
        weight = module.weight_ih_l0
        sparse = cls(
            module.input_size,
            module.hidden_size,
            banks,
            keeps,
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
            device=weight.device,
            dtype=weight.dtype,
        )
        for w, (values, indices) in packed.items():
            sparse._fill_compact(w + "_", values, indices)
        if module.bias:
            with torch.no_grad():
                for w in names[::2]:  # the weight_ih names
                    sfx = w[len("weight_ih") :]
                    folded = getattr(module, "bias_ih" + sfx) + getattr(module, "bias_hh" + sfx)
                    getattr(sparse, "bias" + sfx).copy_(folded)
        return sparse.train(module.training)

    def to_dense(self) -> nn.LSTM:
        """The equivalent `nn.LSTM`: pruned weights are zeros, the folded bias goes to
        `bias_ih_*` and `bias_hh_*` is zero (same outputs up to rounding of the sum)."""
        ref = self.weight_ih_l0_values
        dense = nn.LSTM(
            self.input_size,
            self.hidden_size,
            num_layers=self.num_layers,
            bias=self.has_bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            for w in lstm_weight_names(self.num_layers, self.bidirectional):
                getattr(dense, w).copy_(self._dense_matrix(w + "_"))
                if self.has_bias and w.startswith("weight_ih"):
                    sfx = w[len("weight_ih") :]
                    getattr(dense, "bias_ih" + sfx).copy_(getattr(self, "bias" + sfx))
                    getattr(dense, "bias_hh" + sfx).zero_()
        return dense.train(self.training)

    def extra_repr(self) -> str:
        banks = {bank for _, _, bank, _ in self._layouts.values()}
        keeps = {k for _, _, _, k in self._layouts.values()}
        # one number when every matrix shares it, else the mapping per weight matrix
        bank_size = banks.pop() if len(banks) == 1 else self.bank_size
        k = keeps.pop() if len(keeps) == 1 else self.k
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bias={self.has_bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
            f"bidirectional={self.bidirectional}, bank_size={bank_size}, k={k}"
        )
