"""The balanced sparse product as a custom op, with its pure-PyTorch reference.

`balanced_linear(x, values, indices, bank_size, in_features, bias)` computes
`F.linear(x, W, bias)` where `W [out, in_features]` is stored in the compact balanced format
of `docs/ARCHITECTURE.md` section 2: entry `j` of row `o` is column
`(j // k) * bank_size + indices[o, j]` with weight `values[o, j]`, `k` entries per bank.

The compiled op `torch.ops.bs_lightning.balanced_linear` (schema in `csrc/ops.cpp`, CPU
kernel in `csrc/cpu/`, CUDA kernels in `csrc/cuda/`) is built on first use by
`bs_lightning._build`. When it cannot be built, `balanced_linear` runs the reference.

Command line: `python -m bs_lightning.ops --info` prints the active backend, `--build`
builds the kernels now.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import torch
import torch.nn.functional as F

from bs_lightning import _build

__all__ = [
    "CPU_DENSE_MIN_BATCH_ENV",
    "TILE_ROWS",
    "backend",
    "balanced_linear",
    "balanced_linear_reference",
    "balanced_linear_tiled",
    "balanced_lstm_layer",
    "check_inputs",
    "cpu_tiles_supported",
    "dense_crossover",
    "load",
    "pack_tiles",
    "unpack_tiles",
]

# Set to "1" to ignore the compiled op and always run the pure-PyTorch reference (read on
# every call of these functions; a sparse module reads it when it plans its tile-kernel call,
# see nn/base.py).
FORCE_REFERENCE_ENV = "BS_LIGHTNING_FORCE_REFERENCE"
# rows from which the CPU tile op unpacks (overrides `dense_crossover`'s rule, read per call)
CPU_DENSE_MIN_BATCH_ENV = "BS_LIGHTNING_CPU_DENSE_MIN_BATCH"
MAX_BANK_SIZE = 256  # in-bank indices are uint8
TILE_ROWS = 16  # rows per CPU tile: 16 fp32 lanes, one AVX-512 or two AVX2 registers
MAX_TILED_BANK = 64  # the tile kernel holds a bank's slice of x in at most 4 registers


def check_inputs(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bank_size: int,
    in_features: int,
    bias: torch.Tensor | None,
) -> int:
    """Validate the op's arguments exactly as the C++ `TORCH_CHECK`s do.

    Used by the reference and by the fake (meta) implementation, so every backend raises the
    same errors. Index values are not inspected here (that needs the data); the reference
    checks their range, the compiled kernels read them through a padded copy of `x`.

    Args:
        x: `[..., in_features]`, floating point.
        values: `[out, n_banks * k]`, same dtype and device as `x`.
        indices: `[out, n_banks * k]`, `torch.uint8`, same device as `x`.
        bank_size: columns per bank, 1..256.
        in_features: columns of the dense matrix, >= 1.
        bias: `[out]` in `x.dtype`, or None.

    Returns:
        The keep-count `k` per bank.

    Raises:
        TypeError: wrong dtype of `x`, `values`, `indices` or `bias`.
        ValueError: bad `bank_size`/`in_features`, shape mismatch, or devices differ.
    """
    name = "balanced_linear"
    _check_operands(name, x, values, indices)
    _check_bank_size(name, bank_size, MAX_BANK_SIZE, "uint8 in-bank indices")
    if in_features < 1:
        raise ValueError(f"{name}: in_features must be >= 1, got {in_features}")
    _check_x(name, x, in_features)
    if values.dim() != 2:
        raise ValueError(f"{name}: values must be 2-D [out, n_banks * k], got {list(values.shape)}")
    _check_same_shape(name, values, indices)
    k = _check_width(name, values.size(1), bank_size, in_features)
    _check_devices_and_bias(name, x, values, indices, bias, "out", values.size(0))
    return k


# --- checks shared by the ops (messages equal to the C++ ones in csrc/) ----------------------


def _check_operands(name, x, values, indices) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be floating point, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"{name}: values.dtype ({values.dtype}) must equal x.dtype ({x.dtype})")
    if indices.dtype != torch.uint8:
        raise TypeError(f"{name}: indices must be torch.uint8, got {indices.dtype}")


def _check_bank_size(name: str, bank_size: int, largest: int, why: str) -> None:
    if not 1 <= bank_size <= largest:
        raise ValueError(f"{name}: bank_size must be in 1..{largest} ({why}), got {bank_size}")


def _check_x(name: str, x: torch.Tensor, in_features: int) -> None:
    if x.dim() < 1 or x.size(-1) != in_features:
        raise ValueError(
            f"{name}: x must have shape [..., in_features={in_features}], got {list(x.shape)}"
        )


def _check_same_shape(name: str, values: torch.Tensor, indices: torch.Tensor) -> None:
    if indices.shape != values.shape:
        raise ValueError(
            f"{name}: indices shape {list(indices.shape)} must equal values shape "
            f"{list(values.shape)}"
        )


def _check_width(name: str, width: int, bank_size: int, in_features: int) -> int:
    """Entries per row must be whole banks of k <= bank_size entries; returns k."""
    n_banks = math.ceil(in_features / bank_size)
    if width == 0 or width % n_banks != 0:
        raise ValueError(
            f"{name}: values.size(1) ({width}) must be a positive multiple of n_banks = "
            f"ceil(in_features / bank_size) = {n_banks}"
        )
    k = width // n_banks
    if k > bank_size:
        raise ValueError(f"{name}: keep-count k = {k} per bank exceeds bank_size = {bank_size}")
    return k


def _check_devices_and_bias(name, x, values, indices, bias, out_label: str, out: int) -> None:
    if values.device != x.device or indices.device != x.device:
        raise ValueError(
            f"{name}: x ({x.device}), values ({values.device}) and indices "
            f"({indices.device}) must be on the same device"
        )
    if bias is None:
        return
    if bias.dtype != x.dtype:
        raise TypeError(f"{name}: bias.dtype ({bias.dtype}) must equal x.dtype ({x.dtype})")
    if bias.dim() != 1 or bias.size(0) != out:
        raise ValueError(
            f"{name}: bias must have shape [{out_label}={out}], got {list(bias.shape)}"
        )
    if bias.device != x.device:
        raise ValueError(f"{name}: bias ({bias.device}) must be on x's device ({x.device})")


def balanced_linear_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bank_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch balanced product: unpack to a dense `[out, in]` matrix, then `F.linear`.

    Args:
        x: `[..., in_features]`.
        values: `[out, n_banks * k]` in `x.dtype`.
        indices: `[out, n_banks * k]` uint8 in-bank column indices.
        bank_size: columns per bank (1..256).
        in_features: columns of the dense matrix.
        bias: `[out]` or None.

    Returns:
        `[..., out]` in `x.dtype`.

    Raises:
        TypeError: as `check_inputs`.
        ValueError: as `check_inputs`, or an index points past `in_features`.
    """
    k = check_inputs(x, values, indices, bank_size, in_features, bias)
    out_features, width = values.shape
    # Column of entry j: its bank's first column plus the in-bank index.  [out, width]
    bank_start = torch.arange(width, device=x.device) // k * bank_size
    columns = bank_start + indices.long()
    # compiled graphs cannot branch on data: there scatter_add_'s bounds check stands in
    if not torch.compiler.is_compiling() and columns.numel() and int(columns.max()) >= in_features:
        raise ValueError(
            f"balanced_linear: an index points to column {int(columns.max())}, past "
            f"in_features = {in_features} (indices must be < bank_size within each bank)"
        )
    # Duplicates (padding of a short last bank) carry value 0 and are summed, as in unpacking.
    weight = values.new_zeros(out_features, in_features).scatter_add_(1, columns, values)
    return F.linear(x, weight, bias)


def load() -> bool:
    """Load (building on first use) the compiled op. Returns True when it is available."""
    return _build.load()


def backend(device: torch.device | str = "cpu") -> str:
    """Name the implementation `balanced_linear` uses on `device` after `load()`.

    Returns:
        `"compiled-cpu"`, `"compiled-cuda"` or `"reference"`.
    """
    device = torch.device(device)
    if os.environ.get(FORCE_REFERENCE_ENV) == "1" or not _build.is_loaded():
        return "reference"
    if device.type == "cuda" and not _build.has_cuda_kernels():
        return "reference"
    return f"compiled-{device.type}"


def balanced_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bank_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Balanced sparse `F.linear(x, W, bias)`; compiled op when available, else reference.

    Builds the kernels on the first eager call (cached afterwards). Inside `torch.compile`
    the choice made so far is kept (building is not traceable), so call once eagerly or
    `load()` before compiling to get the compiled op in the graph.

    Args:
        x: `[..., in_features]`, any leading shape, may be non-contiguous.
        values: `[out, n_banks * k]` in `x.dtype`.
        indices: `[out, n_banks * k]` uint8.
        bank_size: columns per bank (1..256).
        in_features: columns of the dense matrix.
        bias: `[out]` or None.

    Returns:
        `[..., out]` in `x.dtype`.

    Raises:
        TypeError: wrong dtype of an argument (see `check_inputs`).
        ValueError: shapes, bank size or devices do not fit (see `check_inputs`).
    """
    if not torch.compiler.is_compiling():
        _build.load()
    if backend(x.device) == "reference":
        return balanced_linear_reference(x, values, indices, bank_size, in_features, bias)
    return torch.ops.bs_lightning.balanced_linear(x, values, indices, bank_size, in_features, bias)


def pack_tiles(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact row-major matrix -> CPU tile layout (`docs/ARCHITECTURE.md` section 3).

    Rows are grouped in tiles of `TILE_ROWS`; within a tile, entry `j` of all its rows is
    stored contiguously, so the kernel reads 16 values and 16 indices per entry with two wide
    loads. Rows past `out` are zero padding (value 0, index 0).

    Args:
        values: `[out, width]` compact values.
        indices: `[out, width]` uint8 in-bank indices.

    Returns:
        `(tile_values, tile_indices)`, each `[ceil(out / 16), width, 16]`.
    """
    out, width = values.shape
    n_tiles = -(-out // TILE_ROWS)
    tiles = []
    for t in (values, indices):
        padded = t.new_zeros(n_tiles * TILE_ROWS, width)
        padded[:out] = t
        tiles.append(padded.view(n_tiles, TILE_ROWS, width).transpose(1, 2).contiguous())
    return tiles[0], tiles[1]


def unpack_tiles(
    tile_values: torch.Tensor, tile_indices: torch.Tensor, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_tiles`: `[n_tiles, width, 16]` pair -> `[out_features, width]` pair."""
    return tuple(
        t.transpose(1, 2).reshape(-1, t.size(1))[:out_features].contiguous()
        for t in (tile_values, tile_indices)
    )


@functools.cache
def _cpu_isa() -> str:
    return torch.ops.bs_lightning.cpu_isa()


def cpu_tiles_supported(bank_size: int) -> bool:
    """True when `balanced_linear_tiled` runs a vectorised kernel for this bank size here.

    That needs the compiled library built with AVX-512 or AVX2 (the permute kernel) and a
    bank of at most 64 columns; elsewhere the row-major kernel of `balanced_linear` is faster.
    """
    if os.environ.get(FORCE_REFERENCE_ENV) == "1" or not _build.is_loaded():
        return False
    return bank_size <= MAX_TILED_BANK and _cpu_isa() != "portable"


def dense_crossover(k: int, bank_size: int) -> int:
    """Input rows from which a dense GEMM beats the tile kernel (CPU), by `k / bank_size`.

    The rule is measured and lives in the C++ op (`tiled_dense_crossover`): it depends on the
    CPU (an AVX-512 AMD never unpacks); the variable `CPU_DENSE_MIN_BATCH_ENV` overrides
    it (read on every call: the modules keep the values they use). Needs `load()`.
    """
    return int(torch.ops.bs_lightning.tiled_dense_crossover(k, bank_size))


def cuda_dense_crossover(k: int, bank_size: int, elem_bytes: int) -> int:
    """Input rows from which the CUDA op unpacks to a dense GEMM, by `k / bank_size` and the
    element size (the rule in `csrc/balanced_linear.h`; `BS_LIGHTNING_CUDA_DENSE_MIN_BATCH`
    overrides it); needs `load()`."""
    return int(torch.ops.bs_lightning.cuda_dense_crossover(k, bank_size, elem_bytes))


def check_tiled_inputs(
    x: torch.Tensor,
    tile_values: torch.Tensor,
    tile_indices: torch.Tensor,
    bank_size: int,
    in_features: int,
    out_features: int,
    bias: torch.Tensor | None,
) -> int:
    """Validate `balanced_linear_tiled`'s arguments as its C++ checks do; returns `k`."""
    name = "balanced_linear_tiled"
    _check_operands(name, x, tile_values, tile_indices)
    _check_bank_size(
        name, bank_size, MAX_TILED_BANK, "the tile kernel holds a bank of x in registers"
    )
    if in_features < 1 or out_features < 1:
        raise ValueError(
            f"{name}: in_features and out_features must be >= 1, got {in_features} and "
            f"{out_features}"
        )
    _check_x(name, x, in_features)
    n_tiles = -(-out_features // TILE_ROWS)
    if tile_values.dim() != 3 or tile_values.size(0) != n_tiles or tile_values.size(2) != TILE_ROWS:
        raise ValueError(
            f"{name}: values must have shape [ceil(out_features / 16) = {n_tiles}, "
            f"n_banks * k, 16], got {list(tile_values.shape)}"
        )
    _check_same_shape(name, tile_values, tile_indices)
    k = _check_width(name, tile_values.size(1), bank_size, in_features)
    _check_devices_and_bias(name, x, tile_values, tile_indices, bias, "out_features", out_features)
    return k


def balanced_linear_tiled(
    x: torch.Tensor,
    tile_values: torch.Tensor,
    tile_indices: torch.Tensor,
    bank_size: int,
    in_features: int,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`balanced_linear` on the CPU tile layout of `pack_tiles`; same result.

    Runs `torch.ops.bs_lightning.balanced_linear_tiled` (CPU) when the library is loaded,
    else the reference on the unpacked matrix.

    Args:
        x: `[..., in_features]` on the CPU.
        tile_values: `[ceil(out_features / 16), n_banks * k, 16]` in `x.dtype`.
        tile_indices: same shape, uint8.
        bank_size: columns per bank, 1..64.
        in_features: columns of the dense matrix.
        out_features: rows of the dense matrix.
        bias: `[out_features]` or None.

    Returns:
        `[..., out_features]` in `x.dtype`.

    Raises:
        TypeError, ValueError: as `check_tiled_inputs`.
    """
    if not torch.compiler.is_compiling():
        _build.load()
    if backend(x.device) == "reference":
        check_tiled_inputs(x, tile_values, tile_indices, bank_size, in_features, out_features, bias)
        values, indices = unpack_tiles(tile_values, tile_indices, out_features)
        return balanced_linear_reference(x, values, indices, bank_size, in_features, bias)
    return torch.ops.bs_lightning.balanced_linear_tiled(
        x, tile_values, tile_indices, bank_size, in_features, out_features, bias
    )


def balanced_lstm_layer(
    gates_x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    tile_values: torch.Tensor,
    tile_indices: torch.Tensor,
    bank_size: int,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer's recurrence in one direction, `W_hh` in the CPU tile layout.

    Runs `torch.ops.bs_lightning.balanced_lstm_layer` (compiled CPU op, fp32): per step
    `gates = gates_x[t] + h W_hh^T`, then PyTorch's gates `i, f, g, o`.

    Args:
        gates_x: `[T, B, 4H]` float32, `x W_ih^T` plus both biases for every step.
        h0: `[B, H]` float32 initial hidden state.
        c0: `[B, H]` float32 initial cell state.
        tile_values: `W_hh [4H, H]` values from `pack_tiles`, `[ceil(4H / 16), width, 16]`.
        tile_indices: the matching uint8 indices.
        bank_size: columns per bank of `W_hh`, 1..64.
        reverse: run the steps from `T - 1` down to 0 (the reverse direction).

    Returns:
        `(out [T, B, H], h_T [B, H], c_T [B, H])`.

    Raises:
        RuntimeError: when the compiled library is not loaded.
        TypeError, ValueError: wrong dtypes or shapes (from the op, naming the argument).
    """
    if not _build.is_loaded():
        raise RuntimeError(f"balanced_lstm_layer needs the compiled kernels: {_build.last_error()}")
    return torch.ops.bs_lightning.balanced_lstm_layer(
        gates_x, h0, c0, tile_values, tile_indices, bank_size, reverse
    )


def check_lstm_cell_inputs(gates_x, h, c, values, indices, bank_size) -> int:
    """Validate `balanced_lstm_cell`'s arguments as its CUDA checks do; returns `k`."""
    name = "balanced_lstm_cell"
    if h.dim() != 2:
        raise ValueError(f"{name}: h must be 2-D [batch, hidden], got {list(h.shape)}")
    batch, hidden = h.shape
    k = check_inputs(h, values, indices, bank_size, hidden, None)
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: h must be float32, float16 or bfloat16, got {h.dtype}")
    if values.size(0) != 4 * hidden:
        raise ValueError(
            f"{name}: values must have 4 * hidden = {4 * hidden} rows (gates i, f, g, o), got "
            f"{values.size(0)}"
        )
    if c.shape != h.shape:
        raise ValueError(f"{name}: c shape {list(c.shape)} must equal h shape {list(h.shape)}")
    if gates_x.shape != (batch, 4 * hidden):
        raise ValueError(
            f"{name}: gates_x must have shape [{batch}, {4 * hidden}], got {list(gates_x.shape)}"
        )
    for t in (c, gates_x):
        if t.dtype != h.dtype:
            raise TypeError(f"{name}: c and gates_x must have h's dtype ({h.dtype}), got {t.dtype}")
        if t.device != h.device:
            raise ValueError(f"{name}: c and gates_x must be on h's device ({h.device})")
    return k


def lstm_cell_reference(
    gates_x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bank_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`balanced_lstm_cell` in PyTorch ops (its CPU kernel): one LSTM time step.

    Args:
        gates_x: `[B, 4H]`, the step's input projection with both biases.
        h: `[B, H]` hidden state.
        c: `[B, H]` cell state.
        values: `W_hh [4H, H]` compact values, gates `i, f, g, o` as PyTorch orders them.
        indices: the matching uint8 in-bank indices.
        bank_size: columns per bank of `W_hh`.

    Returns:
        `(h' [B, H], c' [B, H])`.
    """
    check_lstm_cell_inputs(gates_x, h, c, values, indices, bank_size)
    recurrent = balanced_linear_reference(h, values, indices, bank_size, h.size(1))
    i, f, g, o = (gates_x + recurrent).chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def _register_fake() -> None:
    """Shape/dtype function for `torch.compile` and meta tensors (runs once the op exists)."""

    @torch.library.register_fake("bs_lightning::balanced_linear")
    def _(x, values, indices, bank_size, in_features, bias=None):
        check_inputs(x, values, indices, bank_size, in_features, bias)
        return x.new_empty(*x.shape[:-1], values.size(0))

    @torch.library.register_fake("bs_lightning::balanced_linear_tiled")
    def _(x, values, indices, bank_size, in_features, out_features, bias=None):
        check_tiled_inputs(x, values, indices, bank_size, in_features, out_features, bias)
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("bs_lightning::balanced_lstm_cell")
    def _(gates_x, h, c, values, indices, bank_size):
        check_lstm_cell_inputs(gates_x, h, c, values, indices, bank_size)
        return h.new_empty(h.shape), c.new_empty(c.shape)

    # the CPU kernel is the reference: the op runs everywhere, the CUDA one is fused
    torch.library.register_kernel("bs_lightning::balanced_lstm_cell", "cpu", lstm_cell_reference)

    @torch.library.register_fake("bs_lightning::balanced_lstm_layer")
    def _(gates_x, h0, c0, values, indices, bank_size, reverse):
        if h0.dim() != 2 or gates_x.dim() != 3 or gates_x.shape[1:] != (h0.size(0), 4 * h0.size(1)):
            raise ValueError(
                f"balanced_lstm_layer: gates_x must be [T, B, 4H] for h0 [B, H], got "
                f"{list(gates_x.shape)} and {list(h0.shape)}"
            )
        steps, batch, hidden = gates_x.size(0), h0.size(0), h0.size(1)
        return (
            gates_x.new_empty(steps, batch, hidden),
            h0.new_empty(batch, hidden),
            c0.new_empty(batch, hidden),
        )


_build.on_load("register_fake", _register_fake)


def main(argv: list[str] | None = None) -> int:
    """`python -m bs_lightning.ops --info | --build`."""
    parser = argparse.ArgumentParser(
        prog="python -m bs_lightning.ops", description="Balanced sparse kernels: status, build."
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--info", action="store_true", help="print the active backend")
    group.add_argument("--build", action="store_true", help="build the kernels now")
    args = parser.parse_args(argv)
    ok = load()
    if args.build and not ok:
        print(f"bs_lightning: build failed: {_build.last_error()}", file=sys.stderr)
        return 1
    for line in _build.describe():
        print(line)
    print(f"backend cpu: {backend('cpu')}")
    if torch.cuda.is_available():
        print(f"backend cuda: {backend('cuda')}")
    return 0


# the autograd formulas and the backward ops' fakes register on load, like the ones above
from bs_lightning import ops_backward as _ops_backward  # noqa: E402, F401

if __name__ == "__main__":
    sys.exit(main())
