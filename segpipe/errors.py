"""The exception hierarchy and the exit codes the CLI maps them to.

Every error a user can cause raises a :class:`SegpipeError` subclass whose message names the
case, the file and what to do. The CLI prints ``str(error)`` (one or two lines) and exits with
``error.exit_code``; ``--debug`` adds the traceback.
"""

from __future__ import annotations

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_FINDINGS = 1  # the command ran and found problems (check) or failed a threshold
EXIT_USAGE = 2  # bad arguments, unknown or unused setting
EXIT_DATA = 3  # bad input data: unreadable file, invalid dataset description, refused DICOM
EXIT_STATE = 4  # the workspace lacks what the command needs (no plan, no checkpoint, ...)
EXIT_INTERNAL = 70  # a bug: an unexpected exception (rerun with --debug and report it)
EXIT_PREEMPTED = 75  # train stopped by SIGUSR1 after saving (SLURM: requeued); the same command resumes
EXIT_INTERRUPTED = 130


class SegpipeError(Exception):
    """Base class of every error segpipe raises on purpose."""

    exit_code = EXIT_DATA

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")

    def __reduce__(self):  # keep message and hint across process pools
        return (_rebuild, (type(self), self.message, self.hint))


def _rebuild(cls: type, message: str, hint: str | None) -> SegpipeError:
    return cls(message, hint=hint)


class UsageError(SegpipeError):
    """Wrong arguments or configuration overrides."""

    exit_code = EXIT_USAGE


class NotAvailableError(UsageError):
    """A command or option this version of segpipe does not provide yet."""


class ConfigError(UsageError):
    """A configuration value is invalid."""


class DataError(SegpipeError):
    """Input data that cannot be used as it is."""

    exit_code = EXIT_DATA


class ReadError(DataError):
    """A file could not be read (missing, truncated, unknown format)."""


class DatasetError(DataError):
    """A dataset folder or its description is invalid."""


class DicomError(DataError):
    """A DICOM series is refused (missing slice, gantry tilt, mixed series, ...)."""


class StateError(SegpipeError):
    """The workspace lacks an artefact the command needs."""

    exit_code = EXIT_STATE
