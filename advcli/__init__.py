"""advcli: min-max adversarial training and evaluation of image classifiers, from the command line.

The package is a house in wings; each wing imports only the ones listed before it (tests/test_layers.py):

- top level, shared by every wing: `errors`, `values` (numbers and eps as typed), `config` (settings checked,
  fingerprints), `threads`, `runtime` (device, precision), `distributed` (torchrun);
- `advcli.runs`: what a run leaves on disk (checkpoints, run directories, result tables, sweeps, seeds, trackers);
- `advcli.attacks`: the inner maximisation, written here (`gradient`) or from the reference code (`reference`);
- `advcli.data`: datasets and image folders, as batches of pixels in [0, 1];
- `advcli.models`: architectures, the spec a checkpoint records, weights and models from elsewhere;
- `advcli.evaluation`: the evaluation of a trained model (the cascade, the sanity report, pictures);
- `advcli.training`: the training loop, its objectives and guards;
- `cli`: every command's command line, on top.

Modules moved into the wings in version 0.2.0; importing one by its old flat name (``advcli.evaluate``) raises an
ImportError that names the new place, so old code fails at once and says how to fix it.
"""

from __future__ import annotations

import importlib.abc
import sys

# old flat module -> where it lives now
MOVED_MODULES = {
    "attacks": "advcli.attacks.gradient", "autoattack": "advcli.attacks.reference",
    "data": "advcli.data.builtin", "folder": "advcli.data.folder",
    "checkpoint": "advcli.runs.checkpoint", "paths": "advcli.runs.paths", "report": "advcli.runs.report",
    "stats": "advcli.runs.stats", "seeds": "advcli.runs.seeds", "summary": "advcli.runs.summary",
    "sweep": "advcli.runs.sweep", "tracking": "advcli.runs.tracking", "loggers": "advcli.runs.loggers",
    "weights": "advcli.models.weights", "zoo": "advcli.models.zoo", "sources": "advcli.models.sources",
    "evaluate": "advcli.evaluation.evaluate", "outcomes": "advcli.evaluation.cascade",
    "sanity": "advcli.evaluation.sanity", "leaderboard": "advcli.evaluation.leaderboard",
    "viz": "advcli.evaluation.viz", "train": "advcli.training.train", "epoch": "advcli.training.epoch",
    "objectives": "advcli.training.objectives", "averaging": "advcli.training.averaging",
    "awp": "advcli.training.awp", "guards": "advcli.training.guards",
}


class _MovedModule(importlib.abc.MetaPathFinder):
    """Answers an import of a module's old flat name with an ImportError naming its new place."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.split(".", 1)[1] if fullname.startswith("advcli.") else None
        # attacks and data are now packages of the same name: those imports still work
        if old in MOVED_MODULES and old not in ("attacks", "data"):
            new = MOVED_MODULES[old]
            hint = " (run commands as `python -m advcli train`)" if old == "train" else ""
            raise ImportError(f"{fullname} moved to {new} when advcli was arranged in wings; import it from there{hint}.",
                              name=fullname)
        return None


if not any(isinstance(finder, _MovedModule) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModule())
