"""Sparse inference modules and the compact balanced format they store.

`BalancedSparseLinear`, `BalancedSparseConv2d`, `BalancedSparseLSTM` and
`BalancedSparseConv1D` (Hugging Face GPT-2) and `BalancedSparseMultiheadAttention` hold their weights as values + uint8 in-bank
indices (`format.py`) and compute through `BalancedSparseModule._product` (`base.py`): the
CPU tile kernel (`ops.balanced_linear_tiled`, `ops.balanced_lstm_layer`) on AVX-512 and
AVX2 CPUs, else `ops.balanced_linear`. `BalancedSparseTransformerEncoderLayer` runs an encoder
layer with such children without torch's fused path.
"""

from bs_lightning.nn.attention import BalancedSparseMultiheadAttention
from bs_lightning.nn.conv import BalancedSparseConv2d
from bs_lightning.nn.conv1d import BalancedSparseConv1D
from bs_lightning.nn.format import pack_balanced, unpack_balanced
from bs_lightning.nn.linear import BalancedSparseLinear
from bs_lightning.nn.lstm import BalancedSparseLSTM
from bs_lightning.nn.transformer import BalancedSparseTransformerEncoderLayer

__all__ = [
    "BalancedSparseConv1D",
    "BalancedSparseConv2d",
    "BalancedSparseLSTM",
    "BalancedSparseLinear",
    "BalancedSparseMultiheadAttention",
    "BalancedSparseTransformerEncoderLayer",
    "pack_balanced",
    "unpack_balanced",
]
