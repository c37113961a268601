"""`BalancedSparseMultiheadAttention`: `nn.MultiheadAttention` with compact projections.

The packed input projection (`in_proj_weight [3E, E]` + `in_proj_bias`) and the output
projection are each a `BalancedSparseLinear` when pruned, else a dense `nn.Linear` (one of
them may be pruned alone). Self-attention (`query is key is value`) runs the packed
projection as one product; cross-attention runs its query rows and its key/value rows on
their own inputs (`BalancedSparseLinear.forward_rows`). The attention itself is
`F.scaled_dot_product_attention` (or an explicit softmax when the weights are asked for), with
the masks, layouts and return values of `nn.MultiheadAttention.forward`.

Not convertible (`from_dense` raises, naming the layer): separate key/value sizes
(`kdim`/`vdim != embed_dim`), `add_bias_kv` and `add_zero_attn`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bs_lightning.nn.base import BalancedSparseModule
from bs_lightning.nn.linear import BalancedSparseLinear

__all__ = ["BalancedSparseMultiheadAttention", "check_attention_converts"]


def check_attention_converts(module: nn.MultiheadAttention, name: str | None = None) -> None:
    """Raises when `module` uses a feature the sparse attention does not implement.

    Raises:
        ValueError: for `kdim`/`vdim` other than `embed_dim`, `add_bias_kv` or
            `add_zero_attn`, naming the layer.
    """
    label = f"attention layer {name!r}" if name else "attention layer"
    if not module._qkv_same_embed_dim:
        raise ValueError(
            f"{label} has kdim={module.kdim}, vdim={module.vdim} != embed_dim="
            f"{module.embed_dim} (separate q/k/v projections); only a packed in_proj converts"
        )
    if module.bias_k is not None:
        raise ValueError(f"{label} uses add_bias_kv=True, which the sparse attention lacks")
    if module.add_zero_attn:
        raise ValueError(f"{label} uses add_zero_attn=True, which the sparse attention lacks")


def _projection(
    in_features: int, out_features: int, layout, bias: bool, device, dtype
) -> nn.Module:
    if layout is None:
        return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    bank_size, k = layout
    return BalancedSparseLinear(
        in_features, out_features, bank_size, k, bias=bias, device=device, dtype=dtype
    )


def _rows(proj: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Output features `start:stop` of a projection: `[..., E]` -> `[..., stop - start]`."""
    if isinstance(proj, BalancedSparseLinear):
        return proj.forward_rows(x, start, stop)
    bias = None if proj.bias is None else proj.bias[start:stop]
    return F.linear(x, proj.weight[start:stop], bias)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = not allowed) as `-inf`/0 in `dtype`; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


class BalancedSparseMultiheadAttention(nn.Module):
    """Multi-head attention whose projections are balanced-sparse (see the module docstring).

    Submodules: `in_proj` (`E -> 3E`, rows: query, key, value) and `out_proj` (`E -> E`),
    each `BalancedSparseLinear` (layout given) or `nn.Linear` (layout None). The constructor
    takes shapes only; `from_dense` converts a trained `nn.MultiheadAttention`.

    Args:
        embed_dim: `E`.
        num_heads: heads `H`; `E` must be a multiple of it.
        in_proj_layout: `(bank_size, k)` of the packed input projection, or None (dense).
        out_proj_layout: `(bank_size, k)` of the output projection, or None (dense).
        bias: whether the projections have biases.
        dropout: dropout on the attention weights in training mode.
        batch_first: inputs and outputs `[N, L, E]` (True) or `[L, N, E]` (False).
        device: device of the weights.
        dtype: floating dtype of the weights.

    Raises:
        ValueError: when `embed_dim` is not a multiple of `num_heads`, or a layout does not
            fit (as `BalancedSparseLinear`).
    """

    # read by nn.TransformerEncoder(Layer)'s fast-path checks
    _qkv_same_embed_dim = True

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        in_proj_layout: tuple[int, int] | None,
        out_proj_layout: tuple[int, int] | None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim={embed_dim} of BalancedSparseMultiheadAttention must be a multiple "
                f"of num_heads={num_heads}"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.in_proj = _projection(embed_dim, 3 * embed_dim, in_proj_layout, bias, device, dtype)
        self.out_proj = _projection(embed_dim, embed_dim, out_proj_layout, bias, device, dtype)

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """The packed input projection's bias `[3E]` (as `nn.MultiheadAttention` has it)."""
        return self.in_proj.bias

    @classmethod
    def from_dense(
        cls,
        module: nn.MultiheadAttention,
        in_proj_layout: tuple[int, int] | None,
        out_proj_layout: tuple[int, int] | None,
        name: str | None = None,
    ) -> BalancedSparseMultiheadAttention:
        """Converts an `nn.MultiheadAttention`; a projection with layout None stays dense.

        Args:
            module: the dense attention.
            in_proj_layout: `(bank_size, k)` of `in_proj_weight` (its zeros must fit), or None.
            out_proj_layout: `(bank_size, k)` of `out_proj.weight`, or None.
            name: layer name used in error messages.

        Returns:
            The sparse attention on the weights' device and dtype, in `module`'s mode.

        Raises:
            TypeError: when `module` is not an `nn.MultiheadAttention`.
            ValueError: for an unsupported feature (`check_attention_converts`), or weights
                that do not fit their layout (naming the layer).
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(
                f"BalancedSparseMultiheadAttention.from_dense expects an nn.MultiheadAttention, "
                f"got {type(module).__name__}"
            )
        check_attention_converts(module, name)
        weight = module.in_proj_weight
        bias = module.in_proj_bias is not None
        where = name or "attention"
        packed = nn.Linear(module.embed_dim, 3 * module.embed_dim, bias=bias, device="meta")
        packed.weight, packed.bias = module.in_proj_weight, module.in_proj_bias
        parts = {}
        for key, dense, layout in (
            ("in_proj", packed, in_proj_layout),
            ("out_proj", module.out_proj, out_proj_layout),
        ):
            if layout is None:
                parts[key] = nn.Linear(
                    dense.in_features, dense.out_features, bias, weight.device, weight.dtype
                )
                with torch.no_grad():
                    parts[key].weight.copy_(dense.weight)
                    if bias:
                        parts[key].bias.copy_(dense.bias)
            else:
                parts[key] = BalancedSparseLinear.from_dense(
                    dense, layout[0], k=layout[1], name=f"{where}.{key}"
                )
        sparse = cls(
            module.embed_dim,
            module.num_heads,
            None,
            None,
            bias=bias,
            dropout=module.dropout,
            batch_first=module.batch_first,
            device="meta",
        )
        sparse.in_proj, sparse.out_proj = parts["in_proj"], parts["out_proj"]
        return sparse.train(module.training)

    def to_dense(self) -> nn.MultiheadAttention:
        """The equivalent `nn.MultiheadAttention` (pruned weights are exact zeros)."""
        parts = [
            p.to_dense() if isinstance(p, BalancedSparseModule) else p
            for p in (self.in_proj, self.out_proj)
        ]
        dense = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=parts[0].bias is not None,
            batch_first=self.batch_first,
            device=parts[0].weight.device,
            dtype=parts[0].weight.dtype,
        )
        with torch.no_grad():
            dense.in_proj_weight.copy_(parts[0].weight)
            dense.out_proj.weight.copy_(parts[1].weight)
            if parts[0].bias is not None:
                dense.in_proj_bias.copy_(parts[0].bias)
                dense.out_proj.bias.copy_(parts[1].bias)
        return dense.train(self.training)

    def _project(self, query, key, value, same_kv: bool, self_attention: bool):
        """`(q, k, v)`, each `[N, L or S, E]`, from batch-first inputs."""
        e = self.embed_dim
        if self_attention:
            return self.in_proj(query).chunk(3, dim=-1)
        q = _rows(self.in_proj, query, 0, e)
        if same_kv:
            k, v = _rows(self.in_proj, key, e, 3 * e).chunk(2, dim=-1)
            return q, k, v
        return q, _rows(self.in_proj, key, e, 2 * e), _rows(self.in_proj, value, 2 * e, 3 * e)

    def _mask(self, attn_mask, key_padding_mask, is_causal, n, tgt, src, dtype, device):
        """One additive mask broadcastable to `[N, H, L, S]`, or None."""
        mask = _additive(attn_mask, dtype)
        if mask is not None and mask.dim() == 3:  # [N * H, L, S]
            mask = mask.view(n, self.num_heads, tgt, src)
        if mask is None and is_causal:
            causal = torch.ones(tgt, src, dtype=torch.bool, device=device).triu(1)
            mask = _additive(causal, dtype)
        padding = _additive(key_padding_mask, dtype)
        if padding is not None:
            padding = padding.view(n, 1, 1, src)
            mask = padding if mask is None else mask + padding
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `nn.MultiheadAttention.forward`.

        Args:
            query: `[N, L, E]` (batch_first), `[L, N, E]`, or unbatched `[L, E]`.
            key: `[N, S, E]`, `[S, N, E]` or `[S, E]`.
            value: like `key`.
            key_padding_mask: `[N, S]` (or `[S]` unbatched); bool True = ignore, or additive.
            need_weights: also return the attention weights.
            attn_mask: `[L, S]` or `[N * H, L, S]`; bool True = not allowed, or additive.
            average_attn_weights: average the returned weights over the heads.
            is_causal: with no `attn_mask`, apply a causal mask (with one, a hint: ignored).

        Returns:
            `(output, weights)`: output in the input's layout; weights `[N, L, S]` (averaged)
            or `[N, H, L, S]`, without `N` for unbatched inputs, or None.
        """
        self_attention = query is key and key is value
        same_kv = key is value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, src = query.size(0), query.size(1), key.size(1)
        q, k, v = self._project(query, key, value, same_kv, self_attention)
        # [N, L, E] -> [N, H, L, D]
        heads = self.num_heads, self.head_dim
        q = q.reshape(n, tgt, *heads).transpose(1, 2)
        k = k.reshape(n, src, *heads).transpose(1, 2)
        v = v.reshape(n, src, *heads).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, n, tgt, src, q.dtype, q.device)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # [N, H, L, S]
            if mask is not None:
                scores = scores + mask
            # as nn.MultiheadAttention: the returned weights are the dropped-out ones
            weights = F.dropout(scores.softmax(dim=-1), p, self.training)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )
