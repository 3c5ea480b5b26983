"""Weights advcli did not write: a plain ``state_dict`` (a PyTorch file or a safetensors file) loaded into an
architecture of advcli's registry.

Released models are saved by their authors' scripts, so their key names rarely match advcli's: a prefix
(``module.`` from DataParallel, ``model.``), or positions instead of names (an ``nn.Sequential`` of the same
layers in the same order saves ``0.weight``, ``2.weight``, ...). `match_keys` maps such files when every
tensor's shape and kind (weight, bias, running_mean, ...) fits, and refuses anything else, naming the first
key that does not fit. A file is data, never code: PyTorch files are read with ``weights_only=True``.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from advcli.errors import CheckpointError, MissingExtra

# where authors' scripts nest the weights inside a saved dict
_NESTED = ("state_dict", "model_state_dict", "model", "net")
# BatchNorm's step counter: absent from files written by old PyTorch versions, and not a weight
_COUNTER = "num_batches_tracked"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict file (``.safetensors``, or anything ``torch.save`` wrote), unwrapped from
    ``{"state_dict": ...}`` and the like."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights={path}: no such file. Pass the path of a state_dict saved with torch.save "
                              "(.pt, .pth) or safetensors (.safetensors).")
    loaded = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    for key in _NESTED:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping) and not _all_tensors(loaded):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not loaded or not _all_tensors(loaded):
        raise CheckpointError(
            f"weights={path} is not a state_dict: advcli expects a dict of tensor names to tensors (what "
            "model.state_dict() returns), possibly under a 'state_dict' or 'model' key. For a checkpoint written by "
            "advcli train use ckpt=PATH instead.")
    return dict(loaded)


def _all_tensors(tree: Mapping) -> bool:
    return all(isinstance(value, torch.Tensor) for value in tree.values())


def _read_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"weights={path} was refused: it holds Python objects, not only tensors ({first}). advcli reads weights "
            "with weights_only=True so that a file never runs code; save the model's state_dict() instead of the "
            "model object.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"weights={path} cannot be read: it is truncated or not a PyTorch file "
                              f"({type(error).__name__}).") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise MissingExtra(f"weights={path} is a safetensors file, and reading it needs the safetensors package, "
                           "which is not installed. Install it with `pip install safetensors` (or "
                           "`pip install 'advcli[import]'`) and run again.") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError for a damaged file
        raise CheckpointError(f"weights={path} cannot be read as safetensors ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:200]}).") from None


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, tensor.shape)) + ")"


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fits(source: torch.Tensor, target: torch.Tensor, source_key: str, target_key: str) -> bool:
    return source.shape == target.shape and _kind(source_key) == _kind(target_key)


def match_keys(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *,
               where: str) -> dict[str, str]:
    """``{target key: source key}`` for every tensor of ``target`` (the architecture's own state_dict), taken
    from ``source`` as named, with a prefix removed, or by position; a CheckpointError naming the first key that
    does not fit otherwise. BatchNorm's ``num_batches_tracked`` counters are matched only where both have them."""
    wanted = {k: v for k, v in target.items() if _kind(k) != _COUNTER}
    given = {k: v for k, v in source.items() if _kind(k) != _COUNTER}
    for strip in _prefixes(given, wanted):
        renamed = {key[len(strip):]: key for key in given}
        if renamed.keys() == wanted.keys():
            bad = next((k for k in wanted if given[renamed[k]].shape != wanted[k].shape), None)
            if bad is None:
                return {**renamed, **_counters(source, target, lambda k: strip + k)}
            raise CheckpointError(
                f"{where}: key {renamed[bad]!r} has shape {_shape(given[renamed[bad]])}, but the model's {bad!r} "
                f"has shape {_shape(wanted[bad])}. Check model=NAME and its options (e.g. model.width, "
                "model.hidden), and dataset=NAME (its classes, channels and image size shape the first and last "
                "layers).")
    return _match_by_position(given, wanted, source, target, where=where)


def _prefixes(given: Mapping[str, torch.Tensor], wanted: Mapping[str, torch.Tensor]) -> list[str]:
    """The candidate prefixes of the source's keys: none, and what precedes the first target key's name."""
    first = next(iter(wanted))
    found = [""]
    for key in given:
        if key.endswith("." + first):
            found.append(key[: -len(first)])
    return found


def _counters(source, target, source_name) -> dict[str, str]:
    return {k: source_name(k) for k in target if _kind(k) == _COUNTER and source_name(k) in source}


def _match_by_position(given, wanted, source, target, *, where: str) -> dict[str, str]:
    pairs = list(zip(wanted.items(), given.items()))
    for (target_key, target_tensor), (source_key, source_tensor) in pairs:
        if not _fits(source_tensor, target_tensor, source_key, target_key):
            raise CheckpointError(
                f"{where}: key {source_key!r} {_shape(source_tensor)} does not fit the model's {target_key!r} "
                f"{_shape(target_tensor)}, where the names do not match and the tensors were paired in order. "
                "advcli maps keys that differ by a prefix or by layer position only when every tensor's shape "
                "fits; check model=NAME and its options, and dataset=NAME.")
    if len(given) != len(wanted):
        longer, name = (given, "the file") if len(given) > len(wanted) else (wanted, "the model")
        extra = list(longer)[len(pairs)]
        raise CheckpointError(
            f"{where}: the file has {len(given)} tensors and the model {len(wanted)}; the first without a "
            f"counterpart is {name}'s {extra!r} {_shape(longer[extra])}. Check model=NAME and its options, and "
            "dataset=NAME.")
    mapping = {target_key: source_key for (target_key, _), (source_key, _) in pairs}
    source_counters = [k for k in source if _kind(k) == _COUNTER]
    target_counters = [k for k in target if _kind(k) == _COUNTER]
    if len(source_counters) == len(target_counters):
        mapping.update(zip(target_counters, source_counters))
    return mapping


def load_weights(net: nn.Module, source: Mapping[str, torch.Tensor], *, where: str) -> list[tuple[str, str]]:
    """Copy ``source`` into ``net`` (see `match_keys`); the ``(file key, model key)`` pairs whose names differ."""
    target = net.state_dict()
    mapping = match_keys(source, target, where=where)
    net.load_state_dict({k: source[v] for k, v in mapping.items()}, strict=False)
    return [(v, k) for k, v in mapping.items() if k != v]
