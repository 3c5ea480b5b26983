"""``advcli COMMAND [HYDRA OVERRIDES...]``: pick a command, hand the rest of the line to its Hydra app.

Each command is an ordinary ``@hydra.main`` function, so Hydra's overrides, ``--help``, ``--cfg job``
and ``-m`` (multirun) work exactly as Hydra users expect; this module only removes the command word.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("advcli.train", "train a model (min-max adversarial training), then evaluate it against every attack"),
    "eval": ("advcli.evaluate", "evaluate a checkpoint: advcli eval ckpt=PATH [eps=...] [restarts=...]"),
    "viz": ("advcli.viz", "pictures of a checkpoint: advcli viz ckpt=PATH [compare=PATH2] [eps=...]"),
    "summarize": ("advcli.sweep", "rebuild a sweep's summary table and plot: advcli summarize PATH [PATH ...]"),
}

USAGE = "usage: advcli {" + ",".join(COMMANDS) + "} [HYDRA OVERRIDES ...]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()
) + "\n\nExamples:\n  advcli train attack=pgd eps=8/255\n  advcli train -m eps=2/255,4/255,8/255\n" \
    "  advcli eval ckpt=outputs/DATE/TIME/checkpoint.pt eps=0.2 restarts=5\n" \
    "  advcli viz ckpt=outputs/DATE/TIME/checkpoint.pt compare=outputs/DATE2/TIME2/checkpoint.pt\n  advcli train --help\n" \
    "  advcli summarize outputs/multirun/DATE/TIME"


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    command = sys.argv[1]
    if command not in COMMANDS:
        print(f"advcli: error: unknown command {command!r}; valid commands are: {', '.join(COMMANDS)}.\n\n{USAGE}",
              file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[command][0])
    args = sys.argv[2:]
    if command in ("train", "eval", "viz"):
        check_run_directory(args)
    sys.argv = [f"advcli {command}", *args]
    module.main()


def check_run_directory(args: list[str]) -> None:
    """Hydra creates the run directory before advcli's code runs and shows a traceback when it cannot;
    check it first so that a bad ``hydra.run.dir``/``hydra.sweep.dir`` gets a one-paragraph error."""
    from advcli.config import check_can_create
    from advcli.errors import UserError

    if any(arg in ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i") for arg in args):
        return
    key = "hydra.sweep.dir=" if any(arg in ("-m", "--multirun") for arg in args) else "hydra.run.dir="
    folders = [arg.split("=", 1)[1] for arg in args if arg.startswith(key)] or ["outputs"]
    try:
        for folder in folders:
            check_can_create(folder, setting=key.rstrip("="))
    except UserError as error:
        print(f"advcli: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
