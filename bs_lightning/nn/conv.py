"""`BalancedSparseConv2d`: `nn.Conv2d` as unfold + balanced sparse product.

Matrix view of the weight `[out, in/groups, kh, kw]`: `[out, in/groups * kh * kw]`, one row
per output channel (its own kernel, so groups are respected); banks run along that row.
The forward pads the input (any `padding_mode`), unfolds it into patches
`[N, H_out * W_out, in * kh * kw]` and multiplies them by the sparse matrix: one op call
per group (each group's patches are a contiguous column block, its output channels a
contiguous row block of the packed matrix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from bs_lightning.nn.base import BalancedSparseModule, prune_and_pack

__all__ = ["BalancedSparseConv2d"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class BalancedSparseConv2d(BalancedSparseModule):
    """2-D convolution with a balanced-sparse weight in the compact format.

    Parameters `values [out, n_banks * k]` and `bias [out]` (or None); buffers `indices`
    (uint8) and `layout` (out_channels, in_channels/groups * kh * kw, bank_size, k). The constructor
    takes shapes only; `from_dense` converts a trained `nn.Conv2d`.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: int or `(kh, kw)`.
        bank_size: columns per bank of a row of `in_channels/groups * kh * kw`, at most 256.
        k: weights kept per full bank, `1 <= k <= bank_size`.
        stride, padding, dilation, groups, bias, padding_mode: as `nn.Conv2d` (`padding`
            may be an int, a pair, `"valid"` or `"same"`).
        device: device of the buffers.
        dtype: floating dtype of `values` and `bias`.

    Raises:
        ValueError: channels not divisible by `groups`, unknown `padding`/`padding_mode`,
            `padding="same"` with a stride, or bad `bank_size`/`k`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        bank_size: int,
        k: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups of BalancedSparseConv2d must be an int >= 1, got {groups!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) of "
                f"BalancedSparseConv2d must be divisible by groups ({groups})"
            )
        if padding_mode not in PADDING_MODES:
            raise ValueError(
                f"padding_mode of BalancedSparseConv2d must be one of {PADDING_MODES}, "
                f"got {padding_mode!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self._pad = self._input_padding()  # F.pad order: (left, right, top, bottom)
        self.bank_size = bank_size
        self.k = k
        kh, kw = self.kernel_size
        self._register_compact(
            "", out_channels, in_channels // groups * kh * kw, bank_size, k, device, dtype
        )
        self.register_parameter(
            "bias",
            nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None,
        )

    def _input_padding(self) -> tuple[int, int, int, int]:
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return (0, 0, 0, 0)
            if self.padding != "same":
                raise ValueError(
                    "padding of BalancedSparseConv2d must be an int, a pair, 'valid' or "
                    f"'same', got {self.padding!r}"
                )
            if self.stride != (1, 1):
                raise ValueError(
                    f"padding='same' of BalancedSparseConv2d needs stride 1, got {self.stride}"
                )
            pads = []
            # as nn.Conv2d: the extra pixel of an odd total goes to the right/bottom
            for d, size in zip(reversed(self.dilation), reversed(self.kernel_size), strict=True):
                total = d * (size - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [N, C_in, H, W]` or `[C_in, H, W]` -> `[N, C_out, H_out, W_out]` (or unbatched)."""
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if any(self._pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        h_out = (h - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (w - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        patches = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)
        patches = patches.transpose(1, 2)  # [N, L, C_in * kh * kw], L = H_out * W_out
        row = self._layouts[""][1]  # C_in/groups * kh * kw
        per_group = self.out_channels // self.groups
        outs = []
        for g in range(self.groups):
            rows = slice(g * per_group, (g + 1) * per_group)
            outs.append(
                self._product(
                    "",
                    patches[..., g * row : (g + 1) * row],
                    None if self.bias is None else self.bias[rows],
                    rows if self.groups > 1 else None,
                )
            )
        out = outs[0] if self.groups == 1 else torch.cat(outs, dim=-1)  # [N, L, C_out]
        out = out.transpose(1, 2).reshape(n, self.out_channels, h_out, w_out)
        return out.squeeze(0) if unbatched else out

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        bank_size: int,
        sparsity: float | None = None,
        *,
        k: int | None = None,
        name: str | None = None,
    ) -> BalancedSparseConv2d:
        """Converts an `nn.Conv2d`, pruning it one-shot first when `sparsity` is given.

        Args:
            module: the dense `nn.Conv2d`.
            bank_size: columns per bank of the matrix view (`in/groups * kh * kw` columns).
            sparsity: target sparsity in [0, 1) for a one-shot prune (`prune_matrix`); None
                requires a weight that is already balanced.
            k: keep-count per bank when known; None infers it. Not together with `sparsity`.
            name: layer name used in error messages.

        Returns:
            The sparse module on the weight's device and dtype.

        Raises:
            TypeError: when `module` is not an `nn.Conv2d`.
            ValueError: bad `bank_size`/`sparsity`/`k`, or the weight is not balanced.
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(
                f"BalancedSparseConv2d.from_dense expects an nn.Conv2d, got {type(module).__name__}"
            )
        weight = module.weight.detach()
        values, indices, k = prune_and_pack(
            weight.reshape(weight.shape[0], -1), bank_size, sparsity, k, name
        )
        sparse = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            bank_size,
            k,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        return sparse._take_dense(module, values, indices)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent `nn.Conv2d` (pruned weights are exact zeros)."""
        matrix = self._dense_matrix("")
        dense = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=matrix.device,
            dtype=matrix.dtype,
        )
        return self._give_dense(dense, matrix.reshape(dense.weight.shape))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, padding_mode={self.padding_mode!r}, "
            f"bank_size={self.bank_size}, k={self.k}, bias={self.bias is not None}"
        )
