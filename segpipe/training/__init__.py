"""Training: optimizers and the poly schedule, checkpoints with every RNG state, the
``LightningModule`` and ``fit`` with exact resume."""

from __future__ import annotations

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
