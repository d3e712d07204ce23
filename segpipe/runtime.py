"""Where a run executes, shared by training and distributed prediction: the accelerator a
``device=`` setting names, the precision Lightning runs at, Lightning's start-up notes kept out of
the output, and SLURM's cluster environment without Lightning's own requeue."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import ConfigError

#: the devices ``device=`` takes
DEVICES = ("auto", "cpu", "cuda", "gpu")
#: the precisions ``train`` takes: ``auto`` and the names Lightning knows for full and mixed precision
PRECISIONS = ("auto", "32", "32-true", "16", "16-mixed", "bf16", "bf16-mixed")


def accelerator(device: str) -> str:
    """Lightning's accelerator (``"gpu"`` or ``"cpu"``) for a ``device=`` setting; ``auto`` takes a
    visible CUDA device. Asking for CUDA where none is visible is refused."""
    import torch

    name = str(device).strip().lower()
    if name not in DEVICES:
        raise ConfigError(f"device={device!r} is not valid", hint="valid: cpu, cuda, auto")
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA device is visible", hint="use device=cpu or device=auto")
    return "cpu" if name == "cpu" else "gpu"


def precision(setting: Any, accelerator: str) -> str:
    """Lightning's precision name for a ``precision=`` setting: ``auto`` is bf16 mixed precision on a
    GPU and full precision on a CPU; the short names ``32``, ``16`` and ``bf16`` are spelled out."""
    text = str(setting)
    if text == "auto":
        return "bf16-mixed" if accelerator == "gpu" else "32-true"
    return {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(text, text)


def autocast_dtype(precision: str) -> Any:
    """The torch dtype a sliding window autocasts to under a mixed precision (None at full precision)."""
    import torch

    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up notes (accelerators found, tips about loader workers, "max_epochs
    reached") stay out of the output: segpipe reports its own progress. Errors still show."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def slurm_plugins() -> list[Any]:
    """Under SLURM, Lightning's cluster environment without its own requeue on SIGUSR1: a training
    run saves segpipe's state itself, and a requeued prediction batch skips its finished cases."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
