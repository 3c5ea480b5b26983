"""The evaluation wing: how robust a trained model is, and how much to trust the number.

`evaluate` (a model against a set of attacks), `eval_command` (``advcli eval``: a checkpoint, its settings, a
report), `cascade` (each attack on what the ones before it left standing, with the per-example outcomes), `sanity`
(the gradient-masking report), `leaderboard` (RobustBench's entry format), `viz` (pictures of a checkpoint).

Imports the shared top level, `advcli.runs`, `advcli.attacks`, `advcli.data` and `advcli.models`; never training.
"""
