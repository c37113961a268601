"""`BalancedSparseTransformerEncoderLayer`: `nn.TransformerEncoderLayer` without the fused path.

`nn.TransformerEncoderLayer`'s eval fast path (and `nn.TransformerEncoder`'s nested-tensor
path) hands `self_attn.in_proj_weight`, `linear1.weight` and `linear2.weight` to one fused
kernel, so a layer whose projections are compact cannot take it. This module holds the same
submodules (`self_attn`, `linear1`, `linear2`, norms, dropouts, activation) and always runs
the layer's reference computation (pre- or post-norm), which is what the fused kernel
computes. `nn.TransformerDecoderLayer` has no fused path: its children are converted in place.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BalancedSparseTransformerEncoderLayer"]


class BalancedSparseTransformerEncoderLayer(nn.Module):
    """An encoder layer (self-attention + feed-forward) whose layers may be sparse.

    Built by `from_dense` from an `nn.TransformerEncoderLayer` whose `self_attn`, `linear1`
    or `linear2` were converted; computes exactly what that layer computes.

    Args:
        self_attn: `BalancedSparseMultiheadAttention` (or the dense `nn.MultiheadAttention`).
        linear1: `d_model -> dim_feedforward`, sparse or dense.
        linear2: `dim_feedforward -> d_model`, sparse or dense.
        norm1: the LayerNorm around the attention block.
        norm2: the LayerNorm around the feed-forward block.
        dropout: dropout between the feed-forward layers.
        dropout1: dropout on the attention block's output.
        dropout2: dropout on the feed-forward block's output.
        activation: the feed-forward activation (a module or a function).
        norm_first: pre-norm (True) or post-norm (False).
    """

    def __init__(
        self,
        self_attn: nn.Module,
        linear1: nn.Module,
        linear2: nn.Module,
        norm1: nn.Module,
        norm2: nn.Module,
        dropout: nn.Module,
        dropout1: nn.Module,
        dropout2: nn.Module,
        activation,
        norm_first: bool,
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.linear1 = linear1
        self.dropout = dropout
        self.linear2 = linear2
        self.norm1 = norm1
        self.norm2 = norm2
        self.dropout1 = dropout1
        self.dropout2 = dropout2
        self.activation = activation
        self.norm_first = norm_first

    @classmethod
    def from_dense(cls, layer: nn.TransformerEncoderLayer) -> BalancedSparseTransformerEncoderLayer:
        """The same layer, sharing its (already converted) submodules, in its train/eval mode.

        Raises:
            TypeError: when `layer` is not an `nn.TransformerEncoderLayer`.
        """
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(
                f"BalancedSparseTransformerEncoderLayer.from_dense expects an "
                f"nn.TransformerEncoderLayer, got {type(layer).__name__}"
            )
        new = cls(
            layer.self_attn,
            layer.linear1,
            layer.linear2,
            layer.norm1,
            layer.norm2,
            layer.dropout,
            layer.dropout1,
            layer.dropout2,
            layer.activation,
            layer.norm_first,
        )
        return new.train(layer.training)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        out = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return self.dropout1(out)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """As `nn.TransformerEncoderLayer.forward`: `src [N, L, E]` (batch_first), `[L, N, E]`
        or `[L, E]`, masks as `nn.MultiheadAttention` takes them; returns `src`'s shape."""
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))
