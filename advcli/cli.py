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
}

USAGE = "usage: advcli {" + ",".join(COMMANDS) + "} [HYDRA OVERRIDES ...]\n\ncommands:\n" + "\n".join(
    f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()
) + "\n\nExamples:\n  advcli train attack=pgd eps=8/255\n  advcli train -m eps=2/255,4/255,8/255\n" \
    "  advcli eval ckpt=outputs/DATE/TIME/checkpoint.pt eps=0.2 restarts=5\n  advcli train --help"


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
    sys.argv = [f"advcli {command}", *sys.argv[2:]]
    module.main()


if __name__ == "__main__":
    main()
