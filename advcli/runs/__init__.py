"""The runs wing: what a run leaves on disk and how runs are put side by side.

`checkpoint` (files written atomically, read as data), `paths` (run directories and their lock), `report`
(metrics.json and the printed results), `tables` (every table's layout and cell formats), `stats` (confidence
intervals, what counts as a number), `seeds` and `summary` (several runs as one table), `sweep` (Hydra multirun
jobs), `tracking` and `loggers` (MLflow, TensorBoard, csv).

Imports only the shared top level (`advcli.config`, `advcli.errors`); knows nothing of attacks, data, models,
evaluation or training.
"""
