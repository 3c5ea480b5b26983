"""Where a model comes from: advcli's own checkpoint (``ckpt=``), a plain state_dict (``weights=``), or
RobustBench's zoo (``robustbench=``); and how a run's model is specified from its config (`spec_from_config`).

Every source becomes the same thing, an advcli checkpoint payload (`advcli.runs.checkpoint`): a model spec that
rebuilds the architecture (from advcli's registry, or a class of one's own by its import path, ``model._target_``:
`advcli.models.custom`), its weights, and the settings it is evaluated with. So
``advcli eval`` runs the same code for all three, ``save_checkpoint=PATH`` (``advcli import``) writes any of them
as a checkpoint that sweeps, ``viz`` and later evaluations load, and ``advcli train init=`` starts from any.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from omegaconf import OmegaConf

from advcli import config, data, models
from advcli.errors import ConfigError
from advcli.models import custom, weights, zoo
from advcli.runs import checkpoint

log = logging.getLogger(__name__)

NORMALIZE_CHOICES = ("dataset", "none")


def normalization(choice: Any, info: data.DatasetInfo) -> tuple[list[float], list[float]]:
    """The model's input normalisation from ``model.normalize``: the dataset's statistics (``dataset``), none
    (``none``: raw [0, 1] pixels, as many released models were trained), or ``{mean: [...], std: [...]}``."""
    if choice in (None, "dataset"):
        return list(info.mean), list(info.std)
    if choice == "none":
        return [0.0] * info.in_channels, [1.0] * info.in_channels
    given = config.plain(choice) if hasattr(choice, "items") else {}
    mean, std = given.get("mean"), given.get("std")
    if not (set(given) == {"mean", "std"} and _numbers(mean, info.in_channels) and _numbers(std, info.in_channels)
            and min(std) > 0):
        raise ConfigError(
            f"model.normalize={choice!r} is not a normalisation advcli knows. Use model.normalize=dataset (the "
            f"dataset's mean and std, the default), model.normalize=none (raw [0, 1] pixels), or explicit values, "
            f"one per channel ({info.in_channels} here) with every std > 0: "
            f"model.normalize={{mean:[{','.join(['0.5'] * info.in_channels)}],std:[{','.join(['0.25'] * info.in_channels)}]}}.")
    return [float(m) for m in mean], [float(s) for s in std]


def _numbers(values: Any, count: int) -> bool:
    return isinstance(values, (list, tuple)) and len(values) == count and \
        all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def spec_from_config(model_cfg: Any, info: data.DatasetInfo, *, adversarial_class: bool = False) -> dict[str, Any]:
    """The model spec of a ``model`` config (its ``name``, architecture options and ``normalize``; for a model of
    one's own its ``_target_``, whose constructor's arguments the spec records) on a dataset."""
    options = model_options(model_cfg)
    choice, target = options.pop("normalize", "dataset"), options.pop("_target_", None)
    name = options.pop("name", None) or target  # a config file of one's own may leave the name out
    if name is None:
        raise ConfigError(f"The model config {options} names no model: give model=NAME (configs/model/), or a class "
                          "of your own with model=custom model._target_=PACKAGE.MODULE.CLASS.")
    if name == "robustbench":
        options.setdefault("zoo_dataset", info.name)
    mean, std = normalization(choice, info)
    shape = {"in_channels": info.in_channels, "image_size": info.image_size,
             "num_classes": info.num_classes + int(adversarial_class)}
    arguments = custom.constructor_arguments(custom.import_target(target), target, options, shape) if target else None
    return models.model_spec(name, options, info, normalize=(mean, std), adversarial_class=adversarial_class,
                             target=target, arguments=arguments)


def model_options(model_cfg: Any) -> dict[str, Any]:
    """A model config as plain values; one left unset (``???``, e.g. ``model=custom`` without ``model._target_``)
    is a one-paragraph ConfigError."""
    if OmegaConf.is_config(model_cfg):
        missing = [key for key in model_cfg if OmegaConf.is_missing(model_cfg, key)]
        if missing:
            example = "mypkg.nets.WideNet" if missing[0] == "_target_" else "VALUE"
            raise ConfigError(f"model.{missing[0]} is required and was not given: pass model.{missing[0]}={example} "
                              "on the command line (see configs/model/ for what each model takes).")
    return config.plain(model_cfg)


def check_model(model_cfg: Any, info: data.DatasetInfo, *, adversarial_class: bool) -> None:
    """Before any work: a model of one's own (``model._target_``) imports, takes its arguments and makes one logit
    per output (a dummy forward pass); the built-in models are checked as they are built."""
    spec = spec_from_config(model_cfg, info, adversarial_class=adversarial_class)
    if spec.get("target"):
        models.build_from_spec(spec)


def with_class(payload: dict[str, Any], model_cfg: Any, where: str) -> dict[str, Any]:
    """The checkpoint ``payload`` with its recorded class replaced by the command line's ``model._target_`` (a class
    that moved or was renamed); everything else about the model stays the checkpoint's."""
    if model_cfg is None:
        return payload
    options = model_options(model_cfg)
    target = options.pop("_target_", None)
    options.pop("name", None)
    if target is None or options.pop("normalize", "dataset") != "dataset" or options:
        raise ConfigError(
            f"With ckpt={where} the model (its architecture, options and normalisation) is the checkpoint's; only "
            "its class can be overridden, for a model of one's own whose class moved: model=custom "
            "model._target_=PACKAGE.MODULE.CLASS. Leave out the other model settings, or evaluate a state_dict with "
            "weights=PATH model=NAME.")
    spec = payload["model_spec"]
    if not spec.get("target"):
        raise ConfigError(f"model._target_={target}: {where} holds advcli's built-in {spec['name']}, not a class of "
                          "one's own; leave model= out.")
    log.info("rebuilding the model of %s with %s (model._target_) instead of the recorded %s", where, target,
             spec["target"])
    return {**payload, "model_spec": {**spec, "target": target}}


def dataset_info(dataset_cfg: Any) -> data.DatasetInfo:
    dataset = config.dataset_choice(dataset_cfg)
    return data.dataset_info(dataset.name, **dataset.options)


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file, recorded with what was loaded from it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log_renamed(renamed: list[tuple[str, str]], where: str) -> None:
    if renamed:
        log.info("%s: keys mapped onto the model's (%d): %s", where, len(renamed),
                 ", ".join(f"{old} -> {new}" for old, new in renamed))


def weights_payload(path: str | Path, model_cfg: Any, dataset_cfg: Any, *, settings: Mapping[str, Any],
                    key: str | None = None) -> dict[str, Any]:
    """A checkpoint payload from a state_dict file for the architecture of ``model_cfg`` on ``dataset_cfg``;
    ``settings`` (eps, norm, restarts) are what later evaluations of it default to; ``key``: which of several
    state_dicts in the file (``weights_key``)."""
    spec = spec_from_config(model_cfg, dataset_info(dataset_cfg))
    model = models.build_from_spec(spec)
    state, chosen = weights.choose_state_dict(weights.read_file(path), path, key=key)
    renamed = weights.load_weights(model.net, state, where=f"weights={path}", ordered=weights.keeps_order(path))
    log_renamed(renamed, f"weights={path}")
    source = {"kind": "weights", "path": str(path), "sha256": file_digest(path), "renamed_keys": len(renamed),
              "weights_key": chosen}
    return imported(model, spec, model_cfg, dataset_cfg, settings, source)


def zoo_payload(name: str, dataset_cfg: Any, *, threat_model: str, model_dir: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint payload from RobustBench's zoo: its architecture and weights, its own preprocessing kept."""
    info = dataset_info(dataset_cfg)
    model_cfg = {"name": "robustbench", "zoo_name": name, "zoo_dataset": info.name, "threat_model": threat_model,
                 "normalize": "none"}
    trained = zoo.load_zoo_model(name, info.name, threat_model, model_dir)
    spec = spec_from_config(model_cfg, info)
    model = models.build_from_spec(spec)
    model.net.model.load_state_dict(trained.state_dict())
    source = {"kind": "robustbench", "name": name, "threat_model": threat_model, "model_dir": str(model_dir)}
    return imported(model, spec, model_cfg, dataset_cfg, settings, source)


def imported(model: torch.nn.Module, spec: dict[str, Any], model_cfg: Any, dataset_cfg: Any,
             settings: Mapping[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint payload of a model advcli did not train: no training state, and a config that says so
    (``imported``: its file or zoo name) instead of a training attack it never had."""
    plain_dataset = config.plain(dataset_cfg) if hasattr(dataset_cfg, "items") else dict(dataset_cfg)
    source = {**source, "options": spec["options"], "mean": spec["mean"], "std": spec["std"]}  # as evaluated
    return {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "model": model.state_dict(),
            "model_spec": spec, "epoch": None, "source": source, "history": [],
            "config": {"model": config.plain(model_cfg) if hasattr(model_cfg, "items") else dict(model_cfg),
                       "dataset": plain_dataset, "imported": source.get("name") or Path(source["path"]).name,
                       **settings}}


def eval_payload(cfg: Any) -> tuple[dict[str, Any], str]:
    """The payload ``advcli eval``/``advcli import`` work on, from exactly one of ckpt, weights and robustbench,
    and how to name it in reports."""
    given = [key for key in ("ckpt", "weights", "robustbench") if cfg.get(key) is not None]
    if not given:
        raise ConfigError(
            "advcli eval needs a model, and none was given: ckpt is required unless weights= or robustbench= is: "
            "ckpt=PATH (a checkpoint.pt written by advcli train or advcli import), weights=PATH model=NAME "
            "dataset=NAME (a plain state_dict), or robustbench=NAME dataset=cifar10 threat_model=Linf.")
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} are both given; pass one model: ckpt=, weights= or robustbench=.")
    if given == ["ckpt"]:
        if cfg.get("dataset") is not None:
            raise ConfigError("dataset= comes from the checkpoint with ckpt=PATH (it rebuilds its own model on its "
                              "own data); leave it out, or use weights=PATH model=NAME dataset=NAME for a plain "
                              "state_dict.")
        return with_class(checkpoint.load(cfg.ckpt), cfg.get("model"), str(cfg.ckpt)), str(cfg.ckpt)
    if given == ["robustbench"] and cfg.get("model") is not None:
        raise ConfigError("model= is not used with robustbench=: the zoo model brings its own architecture and "
                          "preprocessing; leave model= out (or evaluate a state_dict with weights= model=NAME).")
    if cfg.get("dataset") is None or (given == ["weights"] and cfg.get("model") is None):
        needs = "model=NAME and dataset=NAME" if given == ["weights"] else "dataset=NAME"
        raise ConfigError(f"{given[0]}= needs {needs}: a file of weights does not say which architecture and data it "
                          f"is for (e.g. advcli eval weights=mnist.pth model=small_cnn dataset=mnist eps=0.1).")
    eps = list(cfg.eps) if isinstance(cfg.eps, Sequence) and not isinstance(cfg.eps, str) else cfg.eps
    norm = zoo.threat_norm(cfg.threat_model, cfg.norm) if given == ["robustbench"] else cfg.norm or "linf"
    settings = {"eps": eps, "norm": norm, "restarts": cfg.restarts or 1}
    if given == ["weights"]:
        return (weights_payload(cfg.weights, cfg.model, cfg.dataset, settings=settings, key=cfg.get("weights_key")),
                str(cfg.weights))
    return (zoo_payload(cfg.robustbench, cfg.dataset, threat_model=cfg.threat_model, model_dir=cfg.robustbench_dir,
                        settings=settings), f"robustbench:{cfg.robustbench}")


def check_eps_known(cfg: Any, where: str) -> None:
    if cfg.eps is None:
        raise ConfigError(f"eps is required with {where}: there is no training run to take it from. Pass the radius "
                          "the model is evaluated at, e.g. eps=0.1 or eps=8/255 (norm=l2 for an L2 radius).")


def save_imported(payload: Mapping[str, Any], path: str | Path) -> None:
    """Write a model (any source) as an advcli checkpoint that eval, viz, sweeps and ``init=`` load."""
    checkpoint.save(path, {k: v for k, v in payload.items() if k not in ("format", "version")})
    log.info("wrote the model as an advcli checkpoint: %s", path)


def described(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``{"source": ...}`` for results of a model advcli did not train (where it came from); else nothing."""
    return {"source": payload["source"]} if payload.get("source") else {}


def import_model(cfg: Any) -> dict[str, Any]:
    """``advcli import``: a model of any source, checked to load, written as an advcli checkpoint."""
    if cfg.get("save_checkpoint") is None:
        raise ConfigError("advcli import needs save_checkpoint=PATH: where to write the advcli checkpoint (e.g. "
                          "advcli import weights=mnist.pth model=small_cnn dataset=mnist save_checkpoint=mnist.pt).")
    payload, where = eval_payload(cfg)
    models.rebuild_model(payload, where, recorded=cfg.get("ckpt") is not None)
    save_imported(payload, cfg.save_checkpoint)
    print(f"wrote {cfg.save_checkpoint}: {payload['model_spec']['name']} from {where}; evaluate it with "
          f"advcli eval ckpt={cfg.save_checkpoint}")
    return {"checkpoint": str(cfg.save_checkpoint), **described(payload)}


# --- advcli train init=: fine-tuning from another model's weights ----------------------------------------

INIT_HEADS = ("auto", "reset", "keep")


def head_keys(state: Mapping[str, Any], net: torch.nn.Module | None = None) -> list[str]:
    """The classification head's keys: those of ``net``'s last ``nn.Linear``, or in a bare state_dict the last
    2-D ``weight`` and the ``bias`` after it."""
    if net is not None:
        prefix = next(name for name, module in reversed(list(net.named_modules())) if module is zoo.last_linear(net))
        return [key for key in state if key.rsplit(".", 1)[0] == prefix]
    weights_2d = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not weights_2d:
        return []
    last = weights_2d[-1]
    bias = last[: -len("weight")] + "bias"
    return [last] + ([bias] if bias in state else [])


def init_source(init: str, spec: Mapping[str, Any], robustbench_dir: str,
                key: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The architecture's weights that ``init=`` names (``robustbench``: the zoo's, for model=robustbench; a path:
    an advcli checkpoint of the same architecture, or a state_dict file; ``key``: which of several state_dicts in
    it, ``weights_key``), and a record of where they came from."""
    if init == "robustbench":
        if spec["name"] != "robustbench":
            raise ConfigError("init=robustbench starts from a RobustBench zoo model's weights, so it needs "
                              "model=robustbench model.zoo_name=NAME; for a file use init=PATH.")
        options = spec["options"]
        trained = zoo.load_zoo_model(options["zoo_name"], options["zoo_dataset"], options.get("threat_model", "Linf"),
                                     robustbench_dir)
        state = {f"model.{k}": v for k, v in trained.state_dict().items()}
        return state, {"kind": "robustbench", "name": options["zoo_name"]}
    path = Path(str(init))
    if not path.is_file():
        raise ConfigError(f"init={init}: no such file. init takes an advcli checkpoint (checkpoint.pt, or one written "
                          "by advcli import), a state_dict file (.pt, .pth, .safetensors), or robustbench.")
    record = {"kind": "weights", "path": str(path), "sha256": file_digest(path)}
    loaded = weights.read_file(path, setting="init")  # read once: an advcli checkpoint or a state_dict
    if checkpoint.is_checkpoint(loaded):
        payload = checkpoint.checked(loaded, path)
        other = payload["model_spec"]
        theirs, ours = models.architecture(other), models.architecture(spec)
        if (theirs, other.get("options", {})) != (ours, spec["options"]):
            how = f"model._target_={theirs}" if other.get("target") else f"model={other['name']}"
            raise ConfigError(
                f"init={init} holds a {theirs} model with options {other.get('options', {})}, and this run "
                f"trains {ours} with {spec['options']}: the weights would not fit. Pass the checkpoint's "
                f"architecture ({how} and its options), or init a state_dict file of this one.")
        if (other["mean"], other["std"]) != (list(spec["mean"]), list(spec["std"])):
            raise ConfigError(
                f"init={init} was trained behind the input normalisation mean={other['mean']} std={other['std']}, and "
                f"this run normalises with mean={spec['mean']} std={spec['std']}: its weights would see inputs on "
                "another scale. Pass the same normalisation (model.normalize=none, or "
                f"model.normalize={{mean:{other['mean']},std:{other['std']}}}).")
        chosen = key or "model"  # the model the run evaluated: with ema.decay, the average
        if chosen not in ("model", "train_model") or chosen not in payload:
            raise ConfigError(f"weights_key={key}: init={init} is an advcli checkpoint, whose weights are 'model' "
                              "(what its run evaluated: with ema.decay the average) and, for an EMA run, "
                              "'train_model'.")
        state = {k[len("net."):]: v for k, v in payload[chosen].items() if k.startswith("net.")}
        classes = {"classes": list(other["classes"])} if other.get("classes") else {}  # what its head's outputs mean
        return state, {**record, "kind": "checkpoint", "weights_key": chosen, **classes}
    state, chosen = weights.choose_state_dict(loaded, path, setting="init", key=key)
    return state, {**record, "weights_key": chosen}


def head_misfit(source_shapes: list[tuple[int, ...]], target_shapes: list[tuple[int, ...]],
                source_classes: Sequence[str] | None, spec: Mapping[str, Any]) -> str | None:
    """Why the source's last layer cannot be this run's (None when it can): other shapes, or, where both sides
    name their classes, other names or another order -- a head of the same shape would then answer with the
    source's classes under this run's names."""
    if source_shapes != target_shapes:
        return (f"the file's last layer has shapes {source_shapes}, this run's {target_shapes} "
                f"({spec['num_classes']} classes)")
    target_classes = spec.get("classes")
    if source_classes and target_classes and list(source_classes) != list(target_classes):
        return (f"its last layer was trained on the classes {list(source_classes)[:10]}, and this run's are "
                f"{list(target_classes)[:10]} (names and order must match for its outputs to mean them)")
    return None


def initialise(model: torch.nn.Module, init: str, head: str, spec: Mapping[str, Any], *,
               robustbench_dir: str, key: str | None = None) -> dict[str, Any]:
    """Load the weights ``init=`` names into ``model.net``: the body always, the head (last layer) when
    ``head`` is keep, or auto and it fits; a new head otherwise. ``key``: which of several state_dicts in the
    file (``weights_key``). Returns what the run records about it."""
    source, record = init_source(init, spec, robustbench_dir, key)
    target = model.net.state_dict()
    if zoo.last_linear(model.net).out_features != models.num_outputs(spec):
        raise ConfigError(f"init={init}: the last nn.Linear of {models.architecture(spec)} does not make its "
                          f"{models.num_outputs(spec)} outputs, so advcli cannot tell which layer is the head "
                          "to keep or replace; fine-tune a model whose last layer is its classifier.")
    target_head = head_keys(target, model.net)
    named_head = [k for k in target_head if k in source]  # the file names the head as the model does
    source_head = named_head if len(named_head) == len(target_head) else head_keys(source)
    misfit = head_misfit([tuple(source[k].shape) for k in source_head], [tuple(target[k].shape) for k in target_head],
                         record.get("classes"), spec)
    keep = head == "keep" or (head == "auto" and misfit is None)
    if keep and misfit is not None:
        raise ConfigError(f"init={init} init_head=keep: {misfit}. Use init_head=reset (a new last layer) to "
                          "fine-tune on other classes.")
    if head == "auto" and misfit is not None:
        log.info("init_head=auto: a new last layer, because %s", misfit)
    if not keep:
        source = {k: v for k, v in source.items() if k not in source_head}
        target = {k: v for k, v in target.items() if k not in target_head}
    mapping = weights.match_keys(source, target, where=f"init={init}", ordered=weights.keeps_order(str(init)))
    model.net.load_state_dict({k: source[v] for k, v in mapping.items()}, strict=False)
    log_renamed([(v, k) for k, v in mapping.items() if k != v], f"init={init}")
    log.info("initialised from %s: %d tensors loaded, %s", init, len(mapping),
             "its last layer kept" if keep else "a new last layer")
    return {**record, "init": str(init), "head": "kept" if keep else "reset"}
