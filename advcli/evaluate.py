"""Robustness evaluation: `evaluate(model, batches, attacks, eps)` and the ``advcli eval`` command.

`evaluate` runs the model in eval mode (BatchNorm statistics frozen), attacks every batch with
every attack of a dict, and returns per attack the accuracy and mean loss on the attacked inputs,
plus ``any_attack``: the accuracy when each example counts as broken if any attack broke it.

``advcli eval ckpt=PATH`` rebuilds the model from the checkpoint alone (architecture, classes,
dataset and its normalisation are stored in it) and evaluates it; eps, norm, restarts, attack
steps, split and number of examples can be overridden and default to the training run's values.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from advcli import checkpoint, config, data, report, runtime
from advcli.attacks import Attack
from advcli.errors import ConfigError, run_guarded
from advcli.models import is_convolutional

log = logging.getLogger(__name__)


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], attacks: Mapping[str, Attack], *,
             eps: float, amp_dtype: torch.dtype | None = None, progress: bool = False, desc: str = "eval",
             total: int | None = None) -> dict[str, dict[str, float]]:
    """Accuracy and loss of ``model`` under each attack (pixels in [0, 1], eps in pixel units).

    Returns ``{name: {"acc", "loss"}, ..., "any_attack": {"acc"}, }`` with fractions in [0, 1].
    The model is left in the train/eval mode it came in, with its weights untouched.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = {name: torch.zeros((), device=device, dtype=torch.long) for name in attacks}
    loss_sum = {name: torch.zeros((), device=device) for name in attacks}
    robust_to_all = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    try:
        for x, y in tqdm(batches, desc=desc, total=total, leave=False, disable=not progress, dynamic_ncols=True):
            unbroken = torch.ones_like(y, dtype=torch.bool)
            for name, attack in attacks.items():
                with runtime.autocast(device, amp_dtype):
                    x_adv = attack(model, x, y, eps)
                    with torch.no_grad():
                        logits = model(x_adv)
                hit = logits.argmax(dim=1) == y
                correct[name] += hit.sum()
                loss_sum[name] += F.cross_entropy(logits.float(), y, reduction="sum")
                unbroken &= hit
            robust_to_all += unbroken.sum()
            seen += y.shape[0]
    finally:
        model.train(was_training)
    if seen == 0:
        raise ConfigError("There were no examples to evaluate; check evaluation.num_examples and the split.")
    results = {name: {"acc": correct[name].item() / seen, "loss": loss_sum[name].item() / seen} for name in attacks}
    results["any_attack"] = {"acc": robust_to_all.item() / seen}
    return results


def evaluation_attacks(attack_cfgs: Mapping[str, Any]) -> tuple[dict[str, Attack], dict[str, dict[str, Any]]]:
    """Attack functions from ``{name: attack config}``, and each one's settings as plain data for reports."""
    attacks, described = {}, {}
    for name, attack_cfg in attack_cfgs.items():
        attacks[name] = hydra.utils.instantiate(attack_cfg)
        plain = OmegaConf.to_container(attack_cfg, resolve=True)
        kind = plain.pop("_target_").rsplit(".", 1)[-1]
        plain.pop("_partial_", None)
        if kind == "fgsm":
            plain.update(steps=1, restarts=1)
        if "loss" in plain:  # the loss the attack maximises; "loss" in results is the measured loss
            plain["attack_loss"] = plain.pop("loss")
        described[name] = {"attack": kind, **plain}
    return attacks, described


def prepare_model(model: nn.Module, device: torch.device, channels_last: Any) -> tuple[nn.Module, bool]:
    """Move ``model`` to ``device``; channels_last (``auto`` = for conv nets) speeds convolutions up on
    CPUs and tensor-core GPUs. Returns the model and whether inputs should be channels_last too."""
    use = is_convolutional(model) if str(channels_last) == "auto" else bool(channels_last)
    model = model.to(device)
    if use:
        model = model.to(memory_format=torch.channels_last)
    return model, use


def output_dir(cfg: DictConfig) -> Path:
    """``output_dir`` if set, else Hydra's run directory; checked writable before work starts."""
    folder = cfg.get("output_dir")
    if folder is None:
        folder = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "outputs/run"
    return config.check_writable(Path(folder))


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """``advcli eval``: load ``cfg.ckpt``, fill unset values from its training config, evaluate."""
    started = time.perf_counter()
    if cfg.ckpt is None:
        raise ConfigError("No checkpoint given: pass ckpt=PATH (a checkpoint.pt from a run directory).")
    payload = checkpoint.load(cfg.ckpt)
    trained = payload["config"]
    # unset values follow the training run, so interpolations like ${eps} resolve to them
    for key in ("eps", "norm", "restarts"):
        if cfg[key] is None:
            cfg[key] = trained[key]
    spec = payload["model_spec"]
    dim = spec["in_channels"] * spec["image_size"] ** 2
    s = config.run_settings(cfg, dim=dim)
    split = config.require_choice("split", cfg.split, ("train", "test"))
    out = output_dir(cfg)
    device = runtime.resolve_device(cfg.device)
    amp_dtype = runtime.resolve_amp(cfg.evaluation.amp, device)
    runtime.seed_everything(cfg.seed)

    dataset = config.dataset_choice(trained["dataset"])
    images = data.load_split(dataset.name, split, root=s.data_root, download=cfg.data.download, **dataset.options)
    if s.num_test is not None:
        images = images.subset(slice(0, s.num_test))
    model, channels_last = prepare_model(checkpoint.rebuild_model(payload, cfg.ckpt), device, cfg.channels_last)
    images = images.to(device)
    if tuple(images.images.shape[1:]) != (spec["in_channels"], spec["image_size"], spec["image_size"]):
        raise checkpoint.CheckpointError(
            f"Checkpoint {cfg.ckpt} expects {spec['in_channels']}x{spec['image_size']}x{spec['image_size']} images, "
            f"but {dataset.name} has {'x'.join(map(str, images.images.shape[1:]))}."
        )

    attacks, described = evaluation_attacks(cfg.evaluation.attacks)
    results = evaluate(model, data.batches(images, s.eval_batch_size, channels_last=channels_last), attacks, eps=s.eps,
                       amp_dtype=amp_dtype, progress=cfg.progress, desc=split,
                       total=data.num_batches(len(images), s.eval_batch_size))
    for name in described:
        results[name].update(described[name])
    metrics = {
        "command": "eval", "checkpoint": str(cfg.ckpt), "dataset": dataset.name, "model": spec["name"], "split": split,
        "eps": s.eps, "eps_text": s.eps_text, "eps_255": s.eps * 255, "norm": s.norm, "restarts": s.restarts,
        "num_examples": len(images), "trained_epochs": payload.get("epoch"), "test": results,
        "wall_time_s": time.perf_counter() - started, "device": str(device),
        "precision": runtime.describe_precision(amp_dtype), "torch": torch.__version__,
    }
    report.write_json(out / "metrics.json", metrics)
    print(f"\n{cfg.ckpt}: {dataset.name} {split} split ({len(images)} examples)\n"
          f"{report.results_table(results, eps=s.eps, norm=s.norm)}\nwrote {out / 'metrics.json'}")
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://advcli.configs", config_name="eval")
def main(cfg: DictConfig) -> float:
    metrics = run_guarded(evaluate_checkpoint, cfg)
    return metrics["test"].get("pgd", metrics["test"]["clean"])["acc"]


if __name__ == "__main__":
    main()
