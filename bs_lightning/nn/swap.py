"""The one submodule swap: replace a module of a model by its dotted name."""

from __future__ import annotations

from torch import nn

__all__ = ["owner_of", "replace_submodule"]


def owner_of(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    """The module holding attribute `qualified` (`"a.b.c"` -> `(model.a.b, "c")`).

    Raises:
        AttributeError: when a parent on the path does not exist (as `get_submodule`).
    """
    parent, _, attr = qualified.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Puts `new` where `model`'s submodule `name` is; `name == ""` means the root.

    Args:
        model: the model to change in place.
        name: dotted module name as in `model.named_modules()`.
        new: the replacement.

    Returns:
        The model's root after the swap: `model`, or `new` when `name` is `""`.
    """
    if not name:
        return new
    owner, attr = owner_of(model, name)
    setattr(owner, attr, new)
    return model
