"""Loading a pretrained Hugging Face model by folder, bundled name or hub id, for the CLIs."""

from __future__ import annotations

import torch
import transformers

from bs_lightning.hf.paths import resolve_model_path

__all__ = ["load_pretrained", "main_output", "model_class"]


def model_class(config: transformers.PretrainedConfig, name: str | None = None) -> type:
    """The class to load: `name`, else the config's `architectures[0]`, else `AutoModel`.

    Raises:
        ValueError: when `name` is not a `transformers.PreTrainedModel` class.
    """
    candidates = [name] if name else list(getattr(config, "architectures", None) or [])
    for cand in candidates:
        cls = getattr(transformers, cand, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
        if name:
            raise ValueError(f"--model-class {name!r} is not a transformers model class")
    return transformers.AutoModel


def main_output(out) -> torch.Tensor:
    """The main output of a forward pass: a tensor as is, a transformers output's `logits` or
    `last_hidden_state`, else the first element (`(logits, state)` of the recipes' LMs)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0]


def load_pretrained(
    name_or_path: str, class_name: str | None = None, dtype: torch.dtype | None = None
) -> tuple[transformers.PreTrainedModel, str]:
    """Loads a pretrained model in eval mode.

    Args:
        name_or_path: a local folder, `all-MiniLM-L6-v2` (bundled), or a hub id.
        class_name: transformers class (default: see `model_class`).
        dtype: weights dtype; None keeps the checkpoint's.

    Returns:
        `(model, resolved path)`.

    Raises:
        ValueError: for a bad `class_name`.
        OSError: when nothing loadable is at `name_or_path` (transformers' own error).
    """
    path = resolve_model_path(name_or_path)
    config = transformers.AutoConfig.from_pretrained(path)
    cls = model_class(config, class_name)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return cls.from_pretrained(path, **kwargs).eval(), path
