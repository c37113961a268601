"""Which layers of a Hugging Face model are pruned and converted.

Default rule: every Linear-like layer (`nn.Linear`, GPT-2 `transformers.pytorch_utils.Conv1D`)
that lives inside the stack of transformer blocks, i.e. whose qualified name has a numeric
component (`bert.encoder.layer.3.attention.self.query`, `transformer.h.0.mlp.c_fc`,
`model.layers.1.self_attn.q_proj`). Embeddings, norms, the pooler and task heads
(`classifier`, `lm_head`, `score`) sit outside the numbered blocks and are left dense.

`include` / `exclude` are `fnmatch` globs on qualified module names. With `include`, the
layers are the modules matched by an include glob instead of the default rule; a matched
module holding a weight matrix it cannot convert (an embedding, a conv) is an error naming
the layer, so a glob never silently skips a layer it names. `exclude` removes layers from
either selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["LINEAR_LIKE", "select_layers"]

# layer types that become sparse inference modules (BalancedSparseLinear / ...Conv1D)
LINEAR_LIKE: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def _as_globs(globs: str | Sequence[str] | None, param: str) -> tuple[str, ...]:
    if globs is None:
        return ()
    if isinstance(globs, str):
        return (globs,)
    out = tuple(globs)
    if not all(isinstance(g, str) and g for g in out):
        raise ValueError(f"{param} must be a glob string or a list of them, got {globs!r}")
    return out


def _in_block(name: str) -> bool:
    # a numbered path component means the module sits in an nn.ModuleList of blocks
    return any(part.isdigit() for part in name.split("."))


def _holds_matrix(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() >= 2


def select_layers(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Lists the layers to prune and convert, in module order.

    Args:
        model: any `nn.Module`, typically a `transformers.PreTrainedModel`.
        include: glob(s) on qualified module names; None = Linear-like layers in the blocks.
        exclude: glob(s) on qualified module names removed from the selection.

    Returns:
        `[(qualified_name, module), ...]`, every module an instance of `LINEAR_LIKE`.

    Raises:
        TypeError: when an include glob matches a module holding a weight matrix that is
            not Linear-like (e.g. an `nn.Embedding`), naming the layer.
        ValueError: when a glob argument is malformed, an include/exclude glob matches no
            module, or the selection ends up empty.
    """
    inc = _as_globs(include, "include")
    exc = _as_globs(exclude, "exclude")
    named = [(n, m) for n, m in model.named_modules() if n]
    names = [n for n, _ in named]
    for param, globs in (("include", inc), ("exclude", exc)):
        for g in globs:
            if not any(fnmatchcase(n, g) for n in names):
                raise ValueError(f"{param} glob {g!r} matches no module of {type(model).__name__}")

    chosen = []
    for name, module in named:
        if inc:
            if not any(fnmatchcase(name, g) for g in inc):
                continue
            if not isinstance(module, LINEAR_LIKE):
                if _holds_matrix(module):
                    raise TypeError(
                        f"cannot convert layer {name!r} of type {type(module).__name__}: "
                        f"convertible types are {[t.__name__ for t in LINEAR_LIKE]}; "
                        f"narrow include or add an exclude glob"
                    )
                continue  # containers, norms, dropout: nothing to convert
        elif not (isinstance(module, LINEAR_LIKE) and _in_block(name)):
            continue
        if any(fnmatchcase(name, g) for g in exc):
            continue
        chosen.append((name, module))
    if not chosen:
        raise ValueError(
            f"no layer of {type(model).__name__} selected (include={include!r}, "
            f"exclude={exclude!r}); Linear-like types: {[t.__name__ for t in LINEAR_LIKE]}"
        )
    return chosen
