"""Training: optimizers and the poly schedule, the ``LightningModule`` and ``fit`` with exact resume.

Modules: ``run_settings`` (a run's settings, checked), ``fit`` (the run), ``callbacks``
(``RunCheckpoint``: saving, resuming, stopping, validation), ``budget`` (the wall-clock budget),
``resume`` (saved states), ``signals`` (SIGTERM, Ctrl-C, SIGUSR1), ``reports`` (metrics.csv and
progress.png), ``validation`` (full-case validation of a fold), ``module``, ``optim``, ``plots``.

``SegmentationModule``, ``fit``, ``train_settings``, ``RunCheckpoint``, ``FoldValidation`` and
``write_reports`` import Lightning and are loaded on first use.
"""

from __future__ import annotations

from typing import Any

from ..checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    to_plain,
)
from .optim import (
    OPTIMIZERS,
    BudgetFit,
    PolyLR,
    build_optimizer,
    build_scheduler,
    fit_budget,
    optim_defaults,
    optim_settings,
    parse_duration,
    poly_factor,
)

_LAZY = {
    "SegmentationModule": "module",
    "confusion_counts": "module",
    "dice_from_counts": "module",
    "FoldValidation": "validation",
    "RunCheckpoint": "callbacks",
    "StopSignals": "signals",
    "TrainingInterrupted": "signals",
    "TrainingPreempted": "signals",
    "TimeBudget": "budget",
    "fit": "fit",
    "train_settings": "run_settings",
    "write_reports": "reports",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHECKPOINT_FORMAT",
    "OPTIMIZERS",
    "BudgetFit",
    "PolyLR",
    "build_optimizer",
    "build_scheduler",
    "capture_rng",
    "fit_budget",
    "load_checkpoint",
    "optim_defaults",
    "optim_settings",
    "parse_duration",
    "poly_factor",
    "restore_rng",
    "save_checkpoint",
    "to_plain",
]
