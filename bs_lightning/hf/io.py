"""Save and load a converted Hugging Face model in its compact form.

A saved folder holds:
- `config.json`: the model config (`config.save_pretrained`), `architectures` set to the
  model class,
- `model.safetensors`: the state dict; sparse layers store only `values` / `indices`
  (+ `bias`); tied tensors (GPT-2 `lm_head.weight`) are stored once,
- `bs_lightning_sparse.json`: the marker, with the model class, dtype, bank size and keep-count
  and, for every sparse layer, its type and shapes, the tied-tensor map and (format version 2)
  the sparsity plan (`SparsityPlan.to_dict()`): the plan recorded for the model by
  `prune_and_convert` / `convert_to_sparse`, completed from the sparse layers themselves.

`load_sparse` rebuilds the architecture from the config with every Linear-like layer created
on the meta device (no storage), swaps the sparse layers in from their shapes, and assigns the
saved tensors, so the dense weights of the sparse layers never exist in memory.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from bs_lightning import __version__
from bs_lightning.hf.select import LINEAR_LIKE
from bs_lightning.nn import BalancedSparseConv1D, BalancedSparseLinear
from bs_lightning.nn.base import BalancedSparseModule
from bs_lightning.nn.swap import owner_of, replace_submodule
from bs_lightning.sparsity import BalancedPattern, PlannedParam, SparsityPlan

__all__ = [
    "MARKER_FILE",
    "WEIGHTS_FILE",
    "dedupe_state",
    "load_sparse",
    "save_sparse",
    "sparse_layers",
]

MARKER_FILE = "bs_lightning_sparse.json"
# keys load_sparse reads from the marker
_MARKER_KEYS = ("model_class", "dtype", "sparse_layers")
WEIGHTS_FILE = "model.safetensors"
# 2 adds the sparsity plan; version 1 folders still load (their plan is read off the layers)
FORMAT_VERSION = 2
# marker "type" -> inference module class
SPARSE_TYPES: dict[str, type[nn.Module]] = {
    "BalancedSparseLinear": BalancedSparseLinear,
    "BalancedSparseConv1D": BalancedSparseConv1D,
}


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> sparse inference module, for every sparse layer of `model`."""
    kinds = tuple(SPARSE_TYPES.values())
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def _layer_entry(module: nn.Module) -> dict:
    return {
        "type": type(module).__name__,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bank_size": module.bank_size,
        "k": module.k,
        "bias": module.bias is not None,
    }


def _planned(name: str, entry: dict) -> PlannedParam:
    """The plan entry of a sparse layer described by its marker entry (`_layer_entry`)."""
    bank, k = entry["bank_size"], entry["k"]
    out_in = (entry["out_features"], entry["in_features"])
    # GPT-2 Conv1D stores its weight [in, out]
    shape = out_in[::-1] if entry["type"] == "BalancedSparseConv1D" else out_in
    return PlannedParam(name, "weight", BalancedPattern(bank), 1 - k / bank, k, shape)


def _plan_to_save(model: nn.Module, layers: dict[str, dict]) -> SparsityPlan:
    """The recorded plan, with every sparse layer's entry checked against the layer."""
    recorded = SparsityPlan.recorded(model)
    entries = {e.name: e for e in recorded} if recorded is not None else {}
    for name, entry in layers.items():
        derived = _planned(name, entry)
        known = entries.get(derived.name)
        # the layer is the truth: a recorded entry that disagrees with it is replaced
        if known is None or known.compact_layout != derived.compact_layout:
            entries[derived.name] = derived
    return SparsityPlan(entries.values())


def _common(entries: dict[str, dict], key: str):
    values = {e[key] for e in entries.values()}
    return values.pop() if len(values) == 1 else None


def dedupe_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drops tensors that share storage with an earlier key (tied weights).

    Args:
        state: a state dict, e.g. `model.state_dict()`.

    Returns:
        `(unique_state, tied)` where `tied[dropped_key] = kept_key`.
    """
    seen: dict[tuple, str] = {}
    unique, tied = {}, {}
    for key, t in state.items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        unique[key] = t.detach().contiguous()
    return unique, tied


def save_sparse(model: transformers.PreTrainedModel, path: str | Path) -> Path:
    """Writes the compact model: config, safetensors weights and the sparse marker.

    Args:
        model: a `PreTrainedModel` converted by `prune_and_convert` (or `convert_to_sparse`).
        path: output folder, created if needed; existing files of the same names are replaced.

    Returns:
        The folder as a `Path`.

    Raises:
        TypeError: when `model` is not a `transformers.PreTrainedModel`, or holds a sparse
            module other than `BalancedSparseLinear` / `BalancedSparseConv1D` (naming it).
        ValueError: when `model` has no sparse layer (convert it first).
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel, got {type(model).__name__}")
    other = [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if isinstance(m, BalancedSparseModule) and type(m).__name__ not in SPARSE_TYPES
    ]
    if other:
        raise TypeError(
            f"cannot save sparse layers {other}: load_sparse rebuilds only {sorted(SPARSE_TYPES)}"
        )
    layers = {n: _layer_entry(m) for n, m in sparse_layers(model).items()}
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no balanced sparse layer "
            f"({', '.join(SPARSE_TYPES)}); call bs_lightning.hf.prune_and_convert first"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    state, tied = dedupe_state(model.state_dict())
    save_file(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
    marker = {
        "format": "bs_lightning.sparse",
        "format_version": FORMAT_VERSION,
        "bs_lightning_version": __version__,
        "model_class": type(model).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),
        # one bank size / keep-count for the whole model when all layers agree, else null
        "bank_size": _common(layers, "bank_size"),
        "k": _common(layers, "k"),
        "sparse_layers": layers,
        "tied": tied,
        "plan": _plan_to_save(model, layers).to_dict(),
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return out


@contextmanager
def _linear_like_on_meta() -> Iterator[None]:
    """Creates every Linear-like layer's parameters on the meta device (no storage).

    Only the Linear-like constructors are redirected: buffers of other modules (BERT's
    `position_ids`, Llama's rotary `inv_freq`, which are not saved) keep their real values.
    """
    originals = {cls: cls.__dict__["__init__"] for cls in LINEAR_LIKE}

    def on_meta(init):
        @functools.wraps(init)
        def init_on_meta(self, *args, **kwargs):
            with torch.device("meta"):
                init(self, *args, **kwargs)

        return init_on_meta

    for cls, init in originals.items():
        cls.__init__ = on_meta(init)
    try:
        yield
    finally:
        for cls, init in originals.items():
            cls.__init__ = init


def _read_marker(folder: Path) -> dict:
    marker_path = folder / MARKER_FILE
    if not marker_path.is_file():
        raise FileNotFoundError(
            f"{marker_path} not found: {folder} is not a folder written by "
            f"bs_lightning.hf.save_sparse"
        )
    try:
        marker = json.loads(marker_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{marker_path} is not valid JSON: {err}") from err
    if not isinstance(marker, dict):
        raise ValueError(f"{marker_path} must hold a JSON object, got {type(marker).__name__}")
    if marker.get("format") != "bs_lightning.sparse" or marker.get("format_version") not in (
        range(1, FORMAT_VERSION + 1)
    ):
        raise ValueError(
            f"{marker_path} has format {marker.get('format')!r} version "
            f"{marker.get('format_version')!r}; this bs_lightning reads "
            f"'bs_lightning.sparse' versions 1..{FORMAT_VERSION}"
        )
    missing = [key for key in _MARKER_KEYS if key not in marker]
    if missing:
        raise ValueError(f"{marker_path} misses the keys {missing}; was it written by save_sparse?")
    return marker


def _dtype(marker: dict, folder: Path) -> torch.dtype:
    dtype = getattr(torch, str(marker["dtype"]), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"{folder / MARKER_FILE} has dtype {marker['dtype']!r}; valid: a floating torch "
            f"dtype such as 'float32', 'float16', 'bfloat16'"
        )
    return dtype


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the folder misses its weights")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error type for a corrupt file
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def _model_class(name: str) -> type[transformers.PreTrainedModel]:
    # only classes exported by transformers itself: the marker never names code to import
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"model_class {name!r} in {MARKER_FILE} is not a transformers PreTrainedModel class"
        )
    return cls


def _build_sparse(name: str, entry: dict, dtype: torch.dtype) -> nn.Module:
    cls = SPARSE_TYPES.get(entry.get("type"))
    if cls is None:
        raise ValueError(
            f"sparse layer {name!r} in {MARKER_FILE} has type {entry.get('type')!r}; "
            f"valid types: {sorted(SPARSE_TYPES)}"
        )
    return cls(
        entry["in_features"],
        entry["out_features"],
        bank_size=entry["bank_size"],
        k=entry["k"],
        bias=entry["bias"],
        dtype=dtype,
    )


def load_sparse(
    path: str | Path, device: str | torch.device | None = None
) -> transformers.PreTrainedModel:
    """Rebuilds a model saved by `save_sparse`, without dense weights for its sparse layers.

    Args:
        path: folder written by `save_sparse` (local; nothing is downloaded).
        device: where to put the model; default CPU.

    Returns:
        The model in eval mode, of the class recorded in the marker, with its sparse layers;
        its sparsity plan is recorded for it (`SparsityPlan.recorded(model)`).

    Raises:
        FileNotFoundError: when the folder has no marker or weights file.
        ValueError: naming the file, when the marker is not valid JSON, misses keys, has an
            unknown format, dtype, model class (or one its config does not fit) or layer type,
            or the weights file is unreadable or does not fit the rebuilt architecture (shapes,
            layouts, in-bank indices).
    """
    folder = Path(path)
    marker = _read_marker(folder)
    cls = _model_class(marker["model_class"])
    dtype = _dtype(marker, folder)
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if cls.config_class is not None and not isinstance(config, cls.config_class):
        raise ValueError(
            f"{folder / MARKER_FILE} names model_class {marker['model_class']!r}, which takes a "
            f"{cls.config_class.__name__}, but {folder / 'config.json'} is a "
            f"{type(config).__name__}"
        )
    with _linear_like_on_meta():
        model = cls._from_config(config, dtype=dtype)
    for name, entry in marker["sparse_layers"].items():
        try:
            dense = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"sparse layer {name!r} in {MARKER_FILE} does not exist in {marker['model_class']}"
            ) from err
        if not isinstance(dense, LINEAR_LIKE):
            raise ValueError(
                f"sparse layer {name!r} in {MARKER_FILE} replaces a {type(dense).__name__}; "
                f"only {[t.__name__ for t in LINEAR_LIKE]} layers can be sparse"
            )
        replace_submodule(model, name, _build_sparse(name, entry, dtype))

    state = _load_weights(folder)
    tied: dict[str, str] = marker.get("tied", {})
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # e.g. a layout or an in-bank index that does not fit
        raise ValueError(f"{folder / WEIGHTS_FILE} does not load: {err}") from err
    missing = sorted(set(result.missing_keys) - set(tied))
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder / WEIGHTS_FILE} does not match {marker['model_class']}: missing "
            f"{missing}, unexpected {sorted(result.unexpected_keys)}"
        )
    for key, source in tied.items():
        owner, attr = owner_of(model, key)
        src_owner, src_attr = owner_of(model, source)
        setattr(owner, attr, getattr(src_owner, src_attr))
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{folder / WEIGHTS_FILE} leaves tensors without data: {left}")
    if "plan" in marker:
        plan = SparsityPlan.from_dict(marker["plan"])
    else:
        plan = SparsityPlan(_planned(n, e) for n, e in marker["sparse_layers"].items())
    plan.record(model)
    if device is not None:
        model.to(device)
    return model.eval()
