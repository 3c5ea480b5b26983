"""The one exception type a user sees: bad input or an environment problem, explained in a paragraph.

Every module raises a subclass of `UserError` (`DataError`, `ModelError`, `CheckpointError`, ...) for
problems the user can fix; the command-line entry points print its message as one paragraph and exit
with status 2 instead of showing a traceback (set `debug=true` to see the traceback). Anything else is a
bug in advcli and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what was wrong and how to fix it."""


class ConfigError(UserError):
    """A configuration value is invalid (bad eps, steps <= 0, unknown choice, ...)."""


def run_guarded(task, cfg):
    """Run ``task(cfg)``; a UserError becomes one paragraph on stderr and exit status 2.

    ``debug=true`` in the config re-raises instead, for the full traceback.
    """
    import sys

    try:
        return task(cfg)
    except UserError as error:
        if cfg.get("debug", False):
            raise
        message = " ".join(str(error).split())
        print(f"advcli: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
