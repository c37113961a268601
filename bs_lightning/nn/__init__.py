"""Sparse inference modules and the compact balanced format they store."""

from bs_lightning.nn.format import pack_balanced, unpack_balanced

__all__ = ["pack_balanced", "unpack_balanced"]
