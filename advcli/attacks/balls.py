"""The threat models (the L-inf and L2 balls) and where in them an attack starts and how it steps.

`Start` is where a first delta lies; attacks take it as ``start="uniform" | "zero" | ("gaussian", std)``, and
`takes_start_flags` lets them take it as the configs spell it too (``random_start``, ``start_std``). `Ascent`
is PGD's walk: steps of a size, each projected back onto the ball and the pixel box.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


# --- the threat models -------------------------------------------------------------------------

def project_linf(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Nearest point of the L-inf ball of radius eps: clip each pixel."""
    return delta.clamp(-eps, eps)


def project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Nearest point of the L2 ball of radius eps: rescale examples whose norm exceeds eps."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def random_linf(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Uniform sample from the L-inf ball."""
    return torch.empty_like(x).uniform_(-eps, eps)


def random_l2(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Uniform sample from the L2 ball: a uniform direction, radius eps * u^(1/d)."""
    direction = torch.randn_like(x)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    d = x[0].numel()
    radius = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype).pow(1.0 / d)
    return direction * radius.view(-1, *([1] * (x.dim() - 1)))


def ascent_linf(grad: torch.Tensor) -> torch.Tensor:
    """Steepest-ascent direction of unit L-inf norm: the gradient's sign."""
    return grad.sign()


def ascent_l2(grad: torch.Tensor) -> torch.Tensor:
    """Steepest-ascent direction of unit L2 norm: the normalised gradient."""
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / norms.view(-1, *([1] * (grad.dim() - 1)))


@dataclass(frozen=True)
class ThreatModel:
    """A norm ball S: the nearest point of S (``project``), a uniform sample of it (``sample``), and the
    steepest-ascent direction of unit norm for a gradient (``ascent``)."""

    project: Callable[[torch.Tensor, float], torch.Tensor]
    sample: Callable[[torch.Tensor, float], torch.Tensor]
    ascent: Callable[[torch.Tensor], torch.Tensor]


THREAT_MODELS = {
    "linf": ThreatModel(project=project_linf, sample=random_linf, ascent=ascent_linf),
    "l2": ThreatModel(project=project_l2, sample=random_l2, ascent=ascent_l2),
}


# --- where an attack starts, and how it steps ----------------------------------------------

START_HELP = ("use start='uniform' (a uniform sample of the ball), start='zero' (x itself) or start=('gaussian', STD) "
              "with STD > 0 (on the command line start=[gaussian,0.001]).")

@dataclass(frozen=True)
class Start:
    """Where an attack's first delta lies: ``uniform`` in the ball, ``zero`` (x itself), or ``gaussian`` noise
    of std ``std`` projected into the ball (TRADES starts from 0.001 * N(0, 1): at delta = 0 its KL loss has a
    zero gradient). Attacks take it as ``start="uniform"``, ``"zero"`` or ``("gaussian", std)``."""

    kind: str
    std: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "zero", "gaussian") or (self.kind == "gaussian") != (self.std > 0):
            raise ValueError(f"{self} is not a start an attack knows: {START_HELP}")

    def point(self, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
        """A first delta for ``x``, inside the ball and the pixel box."""
        ball = THREAT_MODELS[norm]
        if self.kind == "zero":
            return torch.zeros_like(x)
        delta = ball.sample(x, eps) if self.kind == "uniform" else ball.project(self.std * torch.randn_like(x), eps)
        return (x + delta).clamp(0, 1) - x


StartOption = Start | str | tuple | list


def as_start(value: StartOption) -> Start:
    """``"uniform"``, ``"zero"``, ``("gaussian", std)`` (a list, from a config) or a Start, as a Start."""
    if isinstance(value, Start):
        return value
    if isinstance(value, str) and value in ("uniform", "zero"):
        return Start(value)
    pair = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else []  # a config's list too
    if len(pair) == 2 and pair[0] == "gaussian" and isinstance(pair[1], (int, float)) \
            and not isinstance(pair[1], bool) and pair[1] > 0:
        return Start("gaussian", float(pair[1]))
    raise ValueError(f"start={value!r} is not a start an attack knows: {START_HELP}")


START_FLAGS = ("random_start", "start_std")  # the start as the configs and earlier versions spell it


def start_from_flags(random_start: bool | None, start_std: float | None, default: StartOption) -> Start:
    """The start that ``random_start`` and ``start_std`` describe: uniform with ``random_start``, else Gaussian
    noise of std ``start_std`` where it is non-zero, else zero. ``random_start`` left out (None) keeps what
    ``default`` says about it."""
    if random_start is None:
        random_start = as_start(default).kind == "uniform"
    if random_start:
        return Start("uniform")
    return Start("gaussian", float(start_std)) if start_std else Start("zero")


def takes_start_flags(attack: Callable) -> Callable:
    """``attack``, which takes ``start``, also taking the start as the configs spell it (``random_start``,
    ``start_std``): the one place the two spellings meet. Its signature lists both, so config checks see them."""
    signature = inspect.signature(attack)
    default = signature.parameters["start"].default

    @functools.wraps(attack)
    def with_flags(*args: object, **kwargs: object) -> torch.Tensor:
        flags = {name: kwargs.pop(name) for name in START_FLAGS if name in kwargs}
        if flags:
            if "start" in kwargs:
                raise ValueError(
                    f"start={kwargs['start']!r} and {', '.join(f'{k}={v!r}' for k, v in flags.items())} both say where "
                    "the attack starts: give one (start='uniform' | 'zero' | ('gaussian', STD), or random_start and "
                    "start_std; in a config, drop one, e.g. ~attack.random_start on the command line).")
            kwargs["start"] = start_from_flags(flags.get("random_start"), flags.get("start_std"), default)
        return attack(*args, **kwargs)

    flag_parameters = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in START_FLAGS]
    with_flags.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *flag_parameters])
    return with_flags


@takes_start_flags
def start_point(x: torch.Tensor, eps: float, norm: str, *, start: StartOption = "zero") -> torch.Tensor:
    """The first delta of an attack from ``start`` (see `Start`), inside the ball and the pixel box."""
    return as_start(start).point(x, eps, norm)


@dataclass(frozen=True)
class Ascent:
    """PGD's walk: ``steps`` steps of size ``alpha`` in the ``norm`` ball of radius ``eps``."""

    eps: float
    alpha: float
    steps: int
    norm: str

    def step(self, x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One step up ``grad``, projected back onto the ball and the [0, 1] pixel box."""
        ball = THREAT_MODELS[self.norm]
        delta = ball.project(delta + self.alpha * ball.ascent(grad), self.eps)
        return (x + delta).clamp(0, 1) - x  # stays in the ball: the box and ball are both convex around x
