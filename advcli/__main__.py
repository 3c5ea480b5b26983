"""``python -m advcli COMMAND ...``: the same as the ``advcli`` console script (torchrun starts it with ``-m advcli``)."""

from advcli.cli import main

main()
