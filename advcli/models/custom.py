"""Architectures advcli does not ship: an ``nn.Module`` class named by its import path,
``model._target_=mypkg.nets.WideNet``, built behind advcli's ``Normalize`` like a built-in.

The class gets advcli's shape arguments (``in_channels``, ``image_size``, ``num_classes``) where its signature
names them, and the model config's other keys; `constructor_arguments` works out that call once, and a checkpoint
records it (``target`` and ``arguments`` in its model spec), so that a later ``advcli eval ckpt=``, ``viz`` or
``init=`` makes exactly the same call again.

Trust: a checkpoint stays data. Rebuilding its model imports the recorded module the ordinary way, from the
user's environment (installed packages, ``PYTHONPATH``), never from the checkpoint's folder; advcli logs the class
before importing it, and ``model._target_=`` on the command line overrides it. Only ``nn.Module`` subclasses (and
advcli's own model factories, `FACTORIES`) are called, so that a checkpoint cannot name any other callable of
the environment (``os.system``) with arguments of its choosing.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from advcli.errors import ConfigError
from advcli.models.normalize import Normalize

log = logging.getLogger(__name__)

# what advcli itself gives a model, where the constructor takes it
SHAPE_ARGS = ("in_channels", "image_size", "num_classes")
# functions of advcli's own that return a model: the only targets that are not nn.Module classes
FACTORIES = ("advcli.models.timm_net.timm_model",)

_FIX_IMPORT = ("Install the package that defines it, or put the folder holding its module on PYTHONPATH (e.g. "
               "PYTHONPATH=~/code advcli ...)")


def import_target(target: str, *, where: str | None = None) -> Callable[..., nn.Module]:
    """The ``nn.Module`` class at ``target`` ("package.module.Class"; or one of advcli's `FACTORIES`), imported from
    the user's environment. ``where``: the checkpoint that recorded it (None: the command line's
    ``model._target_``), for messages."""
    module_name, _, attribute = str(target).rpartition(".")
    if not module_name:
        raise ConfigError(f"model._target_={target} is not an import path: name the class with its module, e.g. "
                          "model._target_=mypkg.nets.WideNet (the module mypkg/nets.py, the class WideNet).")
    if where is not None:
        log.info("rebuilding model from class %s recorded in %s", target, where)
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except Exception as error:  # the user's module: missing, renamed, or failing at import for its own reasons
        raise ConfigError(_not_importable(target, where, error)) from error
    if not (inspect.isclass(found) and issubclass(found, nn.Module)) and target not in FACTORIES:
        recorded = f" (recorded in {where})" if where is not None else ""
        raise ConfigError(f"model._target_={target}{recorded} is {_what(found)}, not a subclass of torch.nn.Module: "
                          "advcli builds models only from nn.Module classes. Name the network's class.")
    return found


def _what(found: Any) -> str:
    return f"the class {found.__name__}" if inspect.isclass(found) else f"a {type(found).__name__}"


def _not_importable(target: str, where: str | None, error: Exception) -> str:
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    if where is None:
        return (f"model._target_={target} cannot be imported ({reason}). {_FIX_IMPORT}, and check the spelling of "
                "the path (package.module.Class).")
    return (f"Checkpoint {where} records its model as the class {target}, which cannot be imported here ({reason}): "
            f"advcli rebuilds a model of your own by importing the class its checkpoint records. {_FIX_IMPORT}; "
            "or, if the class was moved or renamed, pass its new path to rebuild the model with it: "
            "model=custom model._target_=PACKAGE.MODULE.CLASS (a class taking the same arguments, with the same "
            "layer names).")


def _parameters(factory: Callable[..., nn.Module]) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C extension without a signature: pass the options only
        return {}


def takes_num_classes(factory: Callable[..., nn.Module]) -> bool:
    """Whether advcli can set the number of outputs: the constructor names ``num_classes``."""
    return "num_classes" in _parameters(factory)


def constructor_arguments(factory: Callable[..., nn.Module], target: str, options: Mapping[str, Any],
                          shape: Mapping[str, int]) -> dict[str, Any]:
    """The keyword arguments advcli calls ``factory`` with: each of advcli's ``shape`` values its signature names,
    and the config's ``options``; checked against the signature before anything is built."""
    given_shape = sorted(set(options) & set(SHAPE_ARGS))
    if given_shape:
        raise ConfigError(
            f"model.{given_shape[0]} is given on the command line or in the model config, but advcli passes "
            f"{', '.join(SHAPE_ARGS)} itself (from the dataset, and the trainer for num_classes) wherever "
            f"{target}'s constructor takes them. Remove it; change the data (dataset=...) instead.")
    parameters = _parameters(factory)
    arguments = {**{k: v for k, v in shape.items() if k in parameters}, **options}
    _check_call(factory, target, arguments, where=None)
    return arguments


def _check_call(factory: Callable[..., nn.Module], target: str, arguments: Mapping[str, Any], *,
                where: str | None) -> None:
    """Refuse, in one paragraph, arguments the constructor does not take (or that leave one of its own unset)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**arguments)
    except TypeError as error:
        takes = ", ".join(name for name in signature.parameters if name != "self") or "nothing"
        if where is None:
            raise ConfigError(
                f"model._target_={target} cannot be called with {_call(arguments)} ({error}); its constructor takes "
                f"{takes}. advcli passes {', '.join(SHAPE_ARGS)} where the constructor names them, and every other "
                "key of the model config (add one with +model.KEY=VALUE, drop one with ~model.KEY).") from None
        raise ConfigError(
            f"Checkpoint {where} records its model as {target}{_call(arguments)}, and that class's constructor now "
            f"takes {takes} ({error}). Use the version of the code the checkpoint was trained with, or rebuild the model "
            "with a class that takes these arguments: model=custom model._target_=PACKAGE.MODULE.CLASS.") from None


def _call(arguments: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")"


def build_custom_model(target: str, arguments: Mapping[str, Any], *, in_channels: int, image_size: int,
                       num_outputs: int, mean: Sequence[float], std: Sequence[float],
                       where: str | None = None) -> nn.Module:
    """``nn.Sequential(normalize=Normalize(mean, std), net=target(**arguments))``, its outputs checked.

    ``where``: the checkpoint whose recorded class is rebuilt (logged before the import), None when the class
    comes from the command line."""
    factory = import_target(target, where=where)
    _check_call(factory, target, arguments, where=where)
    try:
        net = factory(**arguments)
    except Exception as error:  # the user's constructor refusing its arguments, in its own words
        reason = " ".join(str(error).split())[:300] or "no message"
        raise ConfigError(f"{target}{_call(arguments)} failed: {reason} ({type(error).__name__}). Check the model "
                          "options (model.KEY=VALUE).") from error
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model._target_={target} returned a {type(net).__name__}, not an nn.Module.")
    check_outputs(net, target, in_channels=in_channels, image_size=image_size, num_outputs=num_outputs,
                  settable=takes_num_classes(factory))
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def check_outputs(net: nn.Module, target: str, *, in_channels: int, image_size: int, num_outputs: int,
                  settable: bool) -> None:
    """One forward pass on a dummy batch (eval mode, no gradient): the net must return ``(N, num_outputs)`` logits.
    It also gives lazy layers their shapes before weights are loaded or an optimiser made."""
    dummy = torch.zeros(2, in_channels, image_size, image_size)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(dummy)
    except Exception as error:
        raise ConfigError(f"{target} fails on a batch of {in_channels}x{image_size}x{image_size} images "
                          f"({type(error).__name__}: {' '.join(str(error).split())[:300]}): it must take the "
                          "dataset's images. Check the dataset (its channels and image size) and the model's "
                          "options.") from error
    finally:
        net.train(was_training)
    if torch.is_tensor(out) and tuple(out.shape) == (2, num_outputs):
        return
    got = f"shape {tuple(out.shape)}" if torch.is_tensor(out) else f"a {type(out).__name__}"
    how = (f"It was given num_classes={num_outputs}: make its last layer return that many logits (a single tensor)."
           if settable else "Its constructor has no num_classes parameter, so advcli cannot set how many outputs it "
           "makes: add num_classes to its __init__, or use it with a dataset and trainer of that many outputs.")
    raise ConfigError(f"{target} returns {got} for a batch of 2 images, but this run needs (2, {num_outputs}): one "
                      f"logit per class (trainer=adv_class adds one for 'adversarial input'). {how}")
