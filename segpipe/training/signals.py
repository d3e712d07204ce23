"""Stopping a training run: SIGTERM, Ctrl-C (SIGINT) and SIGUSR1 ask it to stop at the end of the
iteration in progress after saving it (:class:`StopSignals`); :class:`TrainingInterrupted` (exit 143
or 130) and :class:`TrainingPreempted` (SIGUSR1: the CLI exits 75, and under SLURM the job is
requeued with :func:`slurm_requeue`) end it."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from ..errors import SegpipeError


class TrainingPreempted(Exception):
    """SIGUSR1 stopped the run inside an epoch after saving it (``last.pt``); the same command resumes it."""


class TrainingInterrupted(SegpipeError):
    """SIGTERM or Ctrl-C (SIGINT) stopped the run, after saving it unless it was a second such signal;
    the same command resumes it. The exit code is the shell's for the signal: 128 + its number (143
    for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, *, signum: int = signal.SIGTERM, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum

    def __reduce__(self) -> Any:
        return (_interrupted, (self.message, self.signum, self.hint))


def _interrupted(message: str, signum: int, hint: str | None) -> TrainingInterrupted:
    return TrainingInterrupted(message, signum=signum, hint=hint)


def signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


class StopSignals:
    """SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 while a run trains.

    :func:`fit` installs it for its whole call (in the main thread) and puts the previous handlers
    back at its end. The first signal asks the run to stop: :class:`RunCheckpoint` saves the state
    at the end of the iteration in progress, or of the epoch when the signal came during the epoch's
    validation, and stops (a run that has just finished ends as usual). A second SIGTERM or SIGINT
    stops it at once, without saving: the same command then resumes from the last save. Lightning,
    whose own SIGTERM handler would end the run at once with exit code 0, gets SIGTERM taken back
    when training starts (:meth:`reclaim`).
    """

    NAMES = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self) -> None:
        self.signum = 0  #: the signal that asked the run to stop (0: none)
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if hasattr(signal, name):
                    number = int(getattr(signal, name))
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def reclaim(self) -> None:
        """Handle SIGTERM here again (after Lightning put its own handler in front of this one)."""
        if int(signal.SIGTERM) in self._previous and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == getattr(signal, "SIGUSR1", None):
            self.signum = self.signum or signum  # a scheduler's warning: the stop it asks for is pending
            return
        if self.signum in (0, getattr(signal, "SIGUSR1", None)):
            self.signum = signum  # acted on at the next iteration's (or epoch's) end
            return
        raise TrainingInterrupted(
            f"stopped at once by a second {signal_name(signum)}, without saving; "
            "the same command resumes the run from its last save",
            signum=signum,
        )


def slurm_requeue() -> str | None:
    """Requeue this SLURM job (``scontrol requeue JOBID``); its id, or None outside SLURM or on failure."""
    import subprocess

    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    if not job or not job.replace("_", "").isdigit():  # only a job id ever reaches the command line
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        logging.getLogger("segpipe").warning("could not requeue SLURM job %s: %s", job, exc)
        return None
    if done.returncode != 0:
        logging.getLogger("segpipe").warning("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return None
    return job
