"""``advcli viz``: pictures of what robust training did to a model.

Adversarially trained models have input gradients that look like the object (saliency maps a person can
read; Tsipras et al. 2019, "Robustness may be at odds with accuracy"), large perturbations against them
paint features of the target class, and the loss PGD reaches on them is lower and less spread than on a
standard model. ``advcli viz ckpt=PATH [compare=PATH2]`` writes, for the first test images:

- ``gallery.png``: clean, FGSM and PGD images and the PGD perturbation (scaled), true and predicted labels;
- ``saliency.png``: input-gradient saliency maps, one row per checkpoint, with their mean correlation
  with the image;
- ``loss_distribution.png``: histogram of the per-example loss PGD reaches (best of its restarts);
- ``large_eps.png``: targeted large-radius L2 PGD from one image towards every class.

The computations (`saliency`, `image_correlation`, `pgd_losses`, `towards_each_class`) take plain tensors
and are usable without Hydra; `draw_pictures` draws one picture per function (`draw_gallery`, ...) and
returns the arrays behind every picture.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from advcli import attacks, config, data, runtime
from advcli.models.sources import with_class
from advcli.models.spec import rebuild_model
from advcli.runs import checkpoint, paths
from advcli.runs.checkpoint import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# --- what the pictures show -----------------------------------------------------------------------

def saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Input gradient of the loss, summed over channels: (B, H, W). Pixels that raise the loss when
    brightened are positive."""
    grad = attacks.input_gradient(model, x.detach(), y, torch.zeros_like(x))
    return grad.sum(dim=1)


def image_correlation(maps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per example, the Pearson correlation between |saliency| and the (grey) image: (B,).

    A robust model's gradient concentrates on the object's strokes and edges, so it correlates with the
    image; a standard model's is spread over the whole input."""
    a = maps.abs().flatten(1)
    b = x.mean(dim=1).flatten(1)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def pgd_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
               steps: int = 20, restarts: int = 3) -> torch.Tensor:
    """Per-example cross-entropy at the point PGD reaches, the highest over ``restarts``: (B,)."""
    x_adv = attacks.pgd(model, x, y, eps, norm=norm, steps=steps, restarts=restarts)
    with torch.no_grad():
        return F.cross_entropy(model(x_adv), y, reduction="none")


def towards_each_class(model: nn.Module, x: torch.Tensor, eps: float, *, num_classes: int,
                       steps: int = 100) -> torch.Tensor:
    """Targeted L2 PGD of radius ``eps`` from one image ``x`` (C, H, W) towards every class: (K, C, H, W)."""
    targets = torch.arange(num_classes, device=x.device)
    start = x.unsqueeze(0).expand(num_classes, *x.shape).contiguous()
    return attacks.pgd(model, start, targets, eps, norm="l2", steps=steps, random_start=False, targeted=True)


def default_large_eps(shape: torch.Size) -> float:
    """0.15 x sqrt(d): an RMS change of 0.15 per pixel (4.2 on MNIST, 8.3 on CIFAR-10), far outside any
    threat model, where a robust model's target-class features appear."""
    return 0.15 * math.sqrt(shape.numel())


# --- drawing --------------------------------------------------------------------------------------

DPI = 100
CELL = 1.25  # inches per image cell


@dataclass(frozen=True)
class Settings:
    """How many test images the pictures show and how hard their attacks try."""

    num_images: int = 8  # in the gallery and saliency pictures; the large-eps picture starts from the first
    loss_examples: int = 500  # in the loss distribution
    pgd_steps: int = 20  # the gallery's and the loss distribution's PGD
    restarts: int = 3  # of that PGD (the loss distribution shows the best of them)
    large_eps: float | None = None  # L2 radius of the large-eps picture (None: `default_large_eps`)
    large_eps_steps: int = 100


def draw_pictures(models: dict[str, nn.Module], images: data.ImageSet, *, eps: float, norm: str, out: Path,
                  settings: Settings = Settings(), class_names: list[str] | None = None,
                  num_classes: int | None = None) -> dict[str, dict[str, Any]]:
    """Write the four pictures for ``models`` (label -> model in eval mode, on the images' device) into
    ``out``; return the arrays behind each picture, keyed by file stem.

    ``num_classes``: the data's K (default: the first model's outputs). A model with K + 1 outputs
    (``trainer=adv_class``) has an "adversarial input" flag as its last output; the gallery marks the
    inputs it flags with ⚑ instead of ✗ (refused, not misclassified), and its PGD row is the adaptive
    attack (``loss="rejection_margin"``), which must avoid the flag too.
    """
    x, y = next(data.batches(images.subset(slice(0, settings.num_images)), settings.num_images))
    if num_classes is None:
        with torch.no_grad():
            num_classes = next(iter(models.values()))(x[:1]).shape[1]
    names = [*(class_names or [str(k) for k in range(num_classes)]), "adv"]  # index K: the flag
    arrays: dict[str, dict[str, Any]] = {}
    figure, arrays["gallery"] = draw_gallery(models, x, y, names, eps=eps, norm=norm, settings=settings)
    _save(figure, out / "gallery.png")
    figure, arrays["saliency"] = draw_saliency(models, x, y, names)
    _save(figure, out / "saliency.png")
    figure, arrays["loss_distribution"] = draw_loss_distribution(models, images, eps=eps, norm=norm, settings=settings)
    _save(figure, out / "loss_distribution.png")
    figure, arrays["large_eps"] = draw_large_eps(models, x[0], names, settings=settings)
    _save(figure, out / "large_eps.png")
    return arrays


def draw_gallery(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, names: list[str], *, eps: float,
                 norm: str, settings: Settings) -> tuple[Figure, dict[str, Any]]:
    """Per model, rows of clean, FGSM and PGD images (true and predicted labels) and the PGD change, scaled.

    ``names``: the K class names, then the flag's (see `draw_pictures`)."""
    num_images, num_classes, rows = len(y), len(names) - 1, 4 * len(models)
    figure = _figure(num_images * CELL, rows * CELL)
    axes = figure.subplots(rows, num_images, squeeze=False)
    arrays: dict[str, Any] = {}
    for m, (label, model) in enumerate(models.items()):
        x_fgsm = attacks.fgsm(model, x, y, eps, norm=norm)
        with torch.no_grad():
            flags = model(x[:1]).shape[1] > num_classes
        # against a model with the flag, the PGD row is the adaptive attack, which must avoid the flag too
        x_pgd = attacks.pgd(model, x, y, eps, norm=norm, steps=settings.pgd_steps, restarts=settings.restarts,
                            loss="rejection_margin" if flags else "ce")
        delta = x_pgd - x
        shown = 0.5 + delta / (2 * delta.abs().amax().clamp_min(1e-12))  # scaled so the largest change is visible
        with torch.no_grad():
            predictions = {name: model(v).argmax(1) for name, v in (("clean", x), ("FGSM", x_fgsm), ("PGD", x_pgd))}
        arrays[label] = {"clean": x, "fgsm": x_fgsm, "pgd": x_pgd, "perturbation": shown,
                         **{f"pred_{k.lower()}": v for k, v in predictions.items()}}
        for i in range(num_images):
            for r, (name, v) in enumerate((("clean", x), ("FGSM", x_fgsm), ("PGD", x_pgd))):
                said = predictions[name][i]
                mark = "" if said == y[i] else " ⚑" if said == num_classes else " ✗"
                _show(axes[4 * m + r, i], v[i], f"true {names[y[i]]}, said {names[said]}{mark}")
            _show(axes[4 * m + 3, i], shown[i])
        for r, name in enumerate(("clean", "FGSM", "PGD, adaptive" if flags else "PGD", "PGD change\n(scaled)")):
            axes[4 * m + r, 0].set_ylabel(f"{label}\n{name}", fontsize=7)
    flagged = any(p.eq(num_classes).any() for found in arrays.values()
                  for key, p in found.items() if key.startswith("pred_"))
    figure.suptitle(f"eps={eps:.4g} ({norm}); ✗ = misclassified" + ("; ⚑ = flagged as adversarial" if flagged else ""),
                    fontsize=9)
    return figure, arrays


def draw_saliency(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                  names: list[str]) -> tuple[Figure, dict[str, Any]]:
    """The images, then one row of input-gradient maps per model, each with its correlation with the image."""
    num_images, rows = len(y), 1 + len(models)
    figure = _figure(num_images * CELL, rows * CELL)
    axes = figure.subplots(rows, num_images, squeeze=False)
    for i in range(num_images):
        _show(axes[0, i], x[i], f"true {names[y[i]]}")
    arrays: dict[str, Any] = {}
    for m, (label, model) in enumerate(models.items(), start=1):
        maps = saliency(model, x, y)
        correlation = image_correlation(maps, x)
        arrays[label] = {"maps": maps, "correlation": correlation}
        for i in range(num_images):
            limit = maps[i].abs().amax().clamp_min(1e-12).item()
            _show(axes[m, i], maps[i], f"r={correlation[i]:.2f}", cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes[m, 0].set_ylabel(label, fontsize=7)
    figure.suptitle("input gradient of the loss (red: brighter raises the loss); r = corr(|gradient|, image)",
                    fontsize=8)
    return figure, arrays


def draw_loss_distribution(models: dict[str, nn.Module], images: data.ImageSet, *, eps: float, norm: str,
                           settings: Settings) -> tuple[Figure, dict[str, Any]]:
    """Histograms of the per-example loss PGD reaches on the first ``settings.loss_examples`` images, overlaid."""
    figure = _figure(6, 4)
    ax = figure.add_subplot()
    subset = images.subset(slice(0, settings.loss_examples))
    arrays: dict[str, Any] = {}
    for label, model in models.items():
        losses = torch.cat([pgd_losses(model, xb, yb, eps, norm=norm, steps=settings.pgd_steps,
                                       restarts=settings.restarts) for xb, yb in data.batches(subset, 500)])
        arrays[label] = {"losses": losses}
        ax.hist(losses.cpu().clamp_max(20).numpy(), bins=40, alpha=0.5,
                label=f"{label}: median {losses.median():.2f}")
    ax.set_xlabel(f"cross-entropy at PGD-{settings.pgd_steps}, best of {settings.restarts} restart(s) (clipped at 20)")
    ax.set_ylabel("test examples")
    ax.set_title(f"loss PGD reaches, eps={eps:.4g} ({norm}), {len(subset)} examples", fontsize=9)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure, arrays


def draw_large_eps(models: dict[str, nn.Module], x: torch.Tensor, names: list[str], *,
                   settings: Settings) -> tuple[Figure, dict[str, Any]]:
    """Per model, one image ``x`` (C, H, W) moved by targeted large-radius L2 PGD towards each of the K classes
    (``names``: the K class names, then the flag's), with the probability the model gives each target."""
    num_classes = len(names) - 1
    radius = settings.large_eps if settings.large_eps is not None else default_large_eps(x.shape)
    figure = _figure((num_classes + 1) * CELL, len(models) * CELL)
    axes = figure.subplots(len(models), num_classes + 1, squeeze=False)
    arrays: dict[str, Any] = {}
    for m, (label, model) in enumerate(models.items()):
        moved = towards_each_class(model, x, radius, num_classes=num_classes, steps=settings.large_eps_steps)
        with torch.no_grad():
            reached = model(moved).softmax(1).diagonal()
        arrays[label] = {"images": moved, "target_probability": reached}
        _show(axes[m, 0], x, "start")
        axes[m, 0].set_ylabel(label, fontsize=7)
        for k in range(num_classes):
            _show(axes[m, k + 1], moved[k], f"→{names[k]} p={reached[k]:.2f}")
    figure.suptitle(f"targeted L2 PGD of radius {radius:.3g} towards each class", fontsize=9)
    return figure, arrays


def _figure(width_in: float, height_in: float) -> Figure:
    from matplotlib.figure import Figure  # here, not at the top: importing advcli.evaluation.viz stays cheap

    return Figure(figsize=(width_in, height_in), dpi=DPI)  # savefig needs no canvas attached


def _show(ax, image: torch.Tensor, title: str = "", **style: Any) -> None:
    image = image.detach().float().cpu()
    if image.dim() == 3:
        image = image.squeeze(0) if image.shape[0] == 1 else image.permute(1, 2, 0)
    if image.dim() == 2 and "cmap" not in style:
        style["cmap"] = "gray"
    ax.imshow(image.numpy(), **style)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _save(figure: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


# --- the command ----------------------------------------------------------------------------------

def visualize_checkpoints(cfg: DictConfig) -> dict[str, Any]:
    """``advcli viz``: load ``cfg.ckpt`` (and ``cfg.compare``), draw the pictures for the first test images."""
    started = time.perf_counter()
    sources = {"A": cfg.ckpt} if cfg.compare is None else {"A": cfg.ckpt, "B": cfg.compare}
    payloads = {key: checkpoint.load(path) for key, path in sources.items()}
    for key, payload in payloads.items():  # model._target_=: another class for a checkpoint of a class of one's own
        if key == "A" or payload["model_spec"].get("target"):
            payloads[key] = with_class(payload, cfg.get("model"), str(sources[key]))
    first = payloads["A"]
    config.fill_from_training_run(cfg, first["config"], ("eps", "norm"))
    spec = first["model_spec"]
    dim = spec["in_channels"] * spec["image_size"] ** 2
    norm = config.require_choice("norm", cfg.norm, config.NORMS)
    eps = config.parse_eps(cfg.eps, norm=norm, dim=dim)
    large_eps = None if cfg.large_eps is None else config.parse_eps(cfg.large_eps, norm="l2", dim=dim)
    for key in ("num_images", "loss_examples", "pgd_steps", "restarts"):
        config.require_int(key, cfg[key], minimum=1)
    device = runtime.resolve_device(cfg.device)
    runtime.seed_everything(cfg.seed)
    models = {}
    for key, payload in payloads.items():
        other = payload["model_spec"]
        if (other["in_channels"], other["image_size"], other["num_classes"]) != (
                spec["in_channels"], spec["image_size"], spec["num_classes"]):
            raise checkpoint.CheckpointError(
                f"Checkpoints {cfg.ckpt} and {cfg.compare} are for different inputs or classes "
                f"({spec['in_channels']}x{spec['image_size']}x{spec['image_size']}, {spec['num_classes']} classes vs "
                f"{other['in_channels']}x{other['image_size']}x{other['image_size']}, {other['num_classes']}); "
                "compare checkpoints trained on the same dataset.")
        label = config.training_label(payload["config"])  # e.g. "pgd-trained", "adv_class (pgd)"
        if label in models:
            label = f"{label} ({key})"
        models[label] = rebuild_model(payload, sources[key]).to(device).eval()
    dataset = config.dataset_choice(first["config"]["dataset"])
    images = data.load_split(dataset.name, "test", root=config.data_root(cfg.data.root), download=cfg.data.download,
                             **dataset.options)
    images = images.subset(slice(0, max(cfg.num_images, cfg.loss_examples))).to(device)
    out = paths.output_dir(cfg, exclusive=False)  # pictures only: they may go beside a run that trains
    settings = Settings(num_images=cfg.num_images, loss_examples=cfg.loss_examples, pgd_steps=cfg.pgd_steps,
                        restarts=cfg.restarts, large_eps=large_eps)
    arrays = draw_pictures(models, images, eps=eps, norm=norm, out=out, settings=settings,
                           num_classes=spec["num_classes"], class_names=spec.get("classes"))
    correlations = {label: float(a["correlation"].mean()) for label, a in arrays["saliency"].items()}
    medians = {label: float(a["losses"].median()) for label, a in arrays["loss_distribution"].items()}
    print(f"wrote gallery.png, saliency.png, loss_distribution.png, large_eps.png to {out} "
          f"({time.perf_counter() - started:.1f}s)")
    for label in models:
        print(f"  {label}: mean corr(|saliency|, image) {correlations[label]:.3f}; "
              f"median PGD loss {medians[label]:.3f}")
    return {"out": str(out), "saliency_correlation": correlations, "median_pgd_loss": medians}
