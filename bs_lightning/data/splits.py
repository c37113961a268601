"""Deterministic random splits shared by the classification data modules."""

import torch


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Shuffle `range(n)` with `seed` and cut it into consecutive parts.

    Args:
        n: number of examples.
        fractions: size of each part but the last, as fractions of `n`; the last part gets
            the rest.
        seed: seed of the permutation.

    Returns:
        One index tensor `[n_part]` per part (`len(fractions) + 1` parts).
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for fraction in fractions:
        size = round(n * fraction)
        parts.append(perm[start : start + size])
        start += size
    parts.append(perm[start:])
    return parts
