"""Every exception a user can see, and its one-paragraph rendering.

Each module raises a subclass of `UserError` for problems the user can fix; the commands (`advcli.cli`)
print its message as one paragraph and exit with status 2 instead of showing a traceback (``debug=true``
shows it). Anything else is a bug in advcli and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what was wrong and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration value is invalid (bad eps, steps <= 0, unknown choice, ...)."""


class RunDirectoryBusy(ConfigError):
    """Another live process holds the run directory (`advcli.runs.paths.claim`)."""


class DataError(UserError):
    """A dataset cannot be found, read or generated as asked."""


class ModelError(UserError):
    """A model that cannot be built from the given name or options."""


class CheckpointError(UserError):
    """A checkpoint is missing, damaged, not advcli's, or does not fit the model, the data or the run."""


class SweepError(UserError):
    """A path given to ``advcli summarize`` holds no runs, or a summary cannot be written."""


class MissingExtra(UserError):
    """An optional dependency (an ``advcli[...]`` extra) is not installed."""


class TrackingError(UserError):
    """An experiment tracker (``logger=...``) cannot start or continue its run."""


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


class Interrupted(UserError):
    """SIGINT or SIGTERM stopped the run after a checkpoint was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


def one_paragraph(error: BaseException, *, with_type: bool = False, limit: int | None = None) -> str:
    """The error's message on one line (whitespace collapsed; the type's name when it has none), optionally
    after its type's name (for errors of other libraries quoted inside ours) and cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    if with_type:
        text = f"{type(error).__name__}: {text}"
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"
