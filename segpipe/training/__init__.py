"""Training: optimizers and the poly schedule, checkpoints with every RNG state, the
``LightningModule`` and ``fit`` with exact resume.

``SegmentationModule``, ``fit``, ``train_settings``, ``RunCheckpoint``, ``FoldValidation`` and
``write_reports`` import Lightning and are loaded on first use.
"""

from __future__ import annotations

from typing import Any

from .checkpoint import (
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
    "FoldValidation": "runner",
    "RunCheckpoint": "runner",
    "StopSignals": "runner",
    "TrainingInterrupted": "runner",
    "fit": "runner",
    "train_settings": "runner",
    "write_reports": "runner",
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
