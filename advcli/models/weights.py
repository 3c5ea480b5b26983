"""Weights advcli did not write: a plain ``state_dict`` (a PyTorch file or a safetensors file) loaded into an
architecture of advcli's registry or a class of one's own.

Released models are saved by their authors' scripts, so their key names rarely match advcli's: a prefix
(``module.`` from DataParallel, ``model.``), or positions instead of names (an ``nn.Sequential`` of the same
layers in the same order saves ``0.weight``, ``2.weight``, ...). `match_keys` maps such files when every
tensor's shape and kind (weight, bias, running_mean, ...) fits and the shapes tell the layers paired by position
apart, and refuses anything else, naming the first key that does not fit: two layers of the same shapes are
matched by name or not at all, since their order in a file proves nothing. A file that holds several
state_dicts (``model`` and ``ema``) is read only from the one ``weights_key`` names. A file is data, never code:
PyTorch files are read with ``weights_only=True``, and storages saved on a GPU are mapped to the CPU.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from advcli.errors import CheckpointError, MissingExtra

# BatchNorm's step counter: absent from files written by old PyTorch versions, and not a weight
_COUNTER = "num_batches_tracked"


def keeps_order(path: str | Path) -> bool:
    """Whether a weights file keeps the order its layers were saved in (safetensors files sort their keys)."""
    return Path(path).suffix != ".safetensors"


def read_file(path: str | Path, *, setting: str = "weights") -> Any:
    """What a weights file holds, read as data only (``.safetensors``, or anything ``torch.save`` wrote).
    ``setting``: the key that named the file, for messages."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{setting}={path}: no such file. Pass the path of a state_dict saved with torch.save "
                              "(.pt, .pth) or safetensors (.safetensors).")
    return _read_safetensors(path, setting) if not keeps_order(path) else _read_torch(path, setting)


def read_state_dict(path: str | Path, *, setting: str = "weights", key: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict file (`read_file`), unwrapped from ``{"state_dict": ...}`` and the like."""
    return choose_state_dict(read_file(path, setting=setting), path, setting=setting, key=key)[0]


def state_dict_of(loaded: Any, path: str | Path, *, setting: str = "weights") -> dict[str, torch.Tensor]:
    """The state_dict in what a file held (`read_file`), or a CheckpointError saying it has none."""
    return choose_state_dict(loaded, path, setting=setting)[0]


def choose_state_dict(loaded: Any, path: str | Path, *, setting: str = "weights",
                      key: str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state_dict in what a file held, and the key it was under (None: the file is one). A file whose dict
    holds several (``{"model": ..., "ema": ...}``) is read only from the one ``key`` names: a CheckpointError
    lists them otherwise. ``setting``: the key that named the file, for messages."""
    if _is_state_dict(loaded):
        if key is not None:
            raise CheckpointError(f"weights_key={key}, but {setting}={path} is a single state_dict, not a dict of "
                                  "several; leave weights_key out.")
        return dict(loaded), None
    candidates = [k for k, v in loaded.items() if _is_state_dict(v)] if isinstance(loaded, Mapping) else []
    listed = ", ".join(f"{k!r} ({len(loaded[k])} tensors)" for k in candidates)
    if key is not None and key not in candidates:
        raise CheckpointError(f"weights_key={key}: {setting}={path} has no state_dict under that key"
                              + (f"; it has {listed}. Pass one of them." if candidates else
                                 ", nor under any other: it is not a state_dict file."))
    if key is not None or len(candidates) == 1:
        return dict(loaded[key or candidates[0]]), key or candidates[0]
    if candidates:
        raise CheckpointError(
            f"{setting}={path} holds several state_dicts: {listed}. advcli will not guess which one is the model (an "
            "EMA of the weights and the trained weights themselves differ, and so do their results); choose with "
            f"weights_key=NAME, e.g. weights_key={candidates[-1]}. The choice is recorded with the results."
            + (" (It is an advcli checkpoint: evaluate it with ckpt=PATH.)"
               if loaded.get("format") == "advcli-checkpoint" else ""))
    raise CheckpointError(
        f"{setting}={path} is not a state_dict: advcli expects a dict of tensor names to tensors (what "
        "model.state_dict() returns), possibly under a key such as 'state_dict' or 'model'"
        + (". For a checkpoint written by advcli train use ckpt=PATH instead." if setting == "weights" else "."))


def _is_state_dict(tree: Any) -> bool:
    return isinstance(tree, Mapping) and bool(tree) and all(isinstance(value, torch.Tensor) for value in tree.values())


def _refused_global(error: Exception) -> str:
    """What torch's weights_only loader refused, e.g. ``Unsupported global: GLOBAL torch.nn...Linear``."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    return next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(error).__name__)


def _read_torch(path: Path, setting: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{setting}={path} was refused: it holds Python objects, not only tensors ({_refused_global(error)}). "
            "advcli reads weights with weights_only=True so that a file never runs code; save the model's "
            "state_dict() instead of the model object.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"{setting}={path} cannot be read: it is truncated or not a PyTorch file "
                              f"({type(error).__name__}).") from None


def _read_safetensors(path: Path, setting: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise MissingExtra(f"{setting}={path} is a safetensors file, and reading it needs the safetensors package, "
                           "which is not installed. Install it with `pip install safetensors` (or "
                           "`pip install 'advcli[import]'`) and run again.") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError for a damaged file
        raise CheckpointError(f"{setting}={path} cannot be read as safetensors ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:200]}).") from None


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, tensor.shape)) + ")"


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fits(source: torch.Tensor, target: torch.Tensor, source_key: str, target_key: str) -> bool:
    return source.shape == target.shape and _kind(source_key) == _kind(target_key)


def match_keys(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *, where: str,
               ordered: bool = True) -> dict[str, str]:
    """``{target key: source key}`` for every tensor of ``target`` (the architecture's own state_dict).

    A prefix common to the file's keys (``module.``) is removed; names the model shares are matched by name, and
    only the rest are paired in order (an ``nn.Sequential`` twin: all of them), each pair checked for shape and
    kind. ``ordered``: whether the file keeps the layers' order (safetensors files sort their keys, so their
    tensors are matched by name only). A CheckpointError names the first key that does not fit.
    BatchNorm's ``num_batches_tracked`` counters follow their layer's weight, where the file has them."""
    wanted = {k: v for k, v in target.items() if _kind(k) != _COUNTER}
    given = {k: v for k, v in source.items() if _kind(k) != _COUNTER}
    if not wanted:
        return {}
    strip = max(_prefixes(given, wanted), key=lambda p: sum(k.startswith(p) and k[len(p):] in wanted for k in given))
    renamed = {(key[len(strip):] if key.startswith(strip) else key): key for key in given}
    mapping = {}
    for key in wanted:
        if key in renamed:
            if given[renamed[key]].shape != wanted[key].shape:
                raise CheckpointError(
                    f"{where}: key {renamed[key]!r} has shape {_shape(given[renamed[key]])}, but the model's {key!r} "
                    f"has shape {_shape(wanted[key])}. Check model=NAME and its options (e.g. model.width, "
                    "model.hidden), and dataset=NAME (its classes, channels and image size shape the first and last "
                    "layers).")
            mapping[key] = renamed[key]
    left_target = [k for k in wanted if k not in mapping]
    left_source = [renamed[k] for k in renamed if k not in wanted]
    if left_target or left_source:
        mapping.update(_match_by_position(left_source, left_target, given, wanted, where=where, ordered=ordered))
    return {**mapping, **_counters(source, target, mapping)}


def _prefixes(given: Mapping[str, torch.Tensor], wanted: Mapping[str, torch.Tensor]) -> list[str]:
    """The candidate prefixes of the source's keys: none, and whatever precedes a model key's name."""
    found = {""}
    for key in given:
        for name in wanted:
            if key.endswith("." + name):
                found.add(key[: -len(name)])
    return sorted(found, key=len)


def _counters(source, target, mapping) -> dict[str, str]:
    """Each model counter from the file's counter of the layer its weight came from."""
    found = {}
    for key in target:
        module = key[: -len(_COUNTER)]
        if _kind(key) == _COUNTER and module + "weight" in mapping:
            candidate = mapping[module + "weight"][: -len("weight")] + _COUNTER
            if candidate in source:
                found[key] = candidate
    return found


def _match_by_position(left_source: list[str], left_target: list[str], given, wanted, *, where: str,
                       ordered: bool) -> dict[str, str]:
    """Pair the tensors whose names did not match, in order, each checked for shape and kind."""
    hint = "Check model=NAME and its options, and dataset=NAME."
    if len(left_source) != len(left_target):
        file_longer = len(left_source) > len(left_target)
        longer, tensors = (left_source, given) if file_longer else (left_target, wanted)
        first = longer[min(len(left_source), len(left_target))]
        raise CheckpointError(
            f"{where}: {len(left_source)} of the file's tensors and {len(left_target)} of the model's have no "
            f"counterpart by name; the first without one in order is {'the file' if file_longer else 'the model'}'s "
            f"{first!r} {_shape(tensors[first])}. {hint}")
    if not ordered:
        raise CheckpointError(
            f"{where}: {len(left_source)} tensor name(s) do not match the model's (the first: the file's "
            f"{left_source[0]!r}, the model's {left_target[0]!r}), and a safetensors file does not keep the layers' "
            "order, so advcli cannot pair them by position. Rename the file's keys to the model's, or save a "
            "PyTorch state_dict (torch.save) instead.")
    for source_key, target_key in zip(left_source, left_target):
        if not _fits(given[source_key], wanted[target_key], source_key, target_key):
            raise CheckpointError(
                f"{where}: key {source_key!r} {_shape(given[source_key])} does not fit the model's {target_key!r} "
                f"{_shape(wanted[target_key])}, where the names do not match and the tensors were paired in order. "
                f"advcli maps keys that differ by a prefix or by layer position only when every tensor's shape "
                f"fits. {hint}")
    pairs = dict(zip(left_target, left_source))
    _refuse_interchangeable(pairs, wanted, where=where)
    return pairs


def _layer(key: str) -> str:
    return key.rpartition(".")[0]


def _refuse_interchangeable(pairs: Mapping[str, str], wanted: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Refuse pairs made by position where two of the model's layers have the same tensors' shapes: the file's
    order is all that put each file layer on its model layer, and a file that stores them in another order would
    swap them without any shape saying so."""
    shapes: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for target_key in pairs:
        shapes.setdefault(_layer(target_key), []).append((_kind(target_key), tuple(wanted[target_key].shape)))
    first_of: dict[tuple, str] = {}
    for layer, signature in shapes.items():
        twin = first_of.setdefault(tuple(signature), layer)
        if twin == layer:
            continue
        files = [_layer(next(source for target, source in pairs.items() if _layer(target) == name))
                 for name in (twin, layer)]
        raise CheckpointError(
            f"{where}: the model's layers {twin!r} and {layer!r} have tensors of the same shapes, and the file's "
            f"{files[0]!r} and {files[1]!r} do not match them by name, so only their order in the file would say which "
            "is which; a file that stores them in another order would have them swapped without any error. advcli "
            "matches such layers by name only: rename the file's keys to the model's (load it with torch.load, "
            "rename the keys of the dict, torch.save it again) and run again.")


def load_weights(net: nn.Module, source: Mapping[str, torch.Tensor], *, where: str,
                 ordered: bool = True) -> list[tuple[str, str]]:
    """Copy ``source`` into ``net`` (see `match_keys`); the ``(file key, model key)`` pairs whose names differ."""
    target = net.state_dict()
    mapping = match_keys(source, target, where=where, ordered=ordered)
    net.load_state_dict({k: source[v] for k, v in mapping.items()}, strict=False)
    return [(v, k) for k, v in mapping.items() if k != v]
