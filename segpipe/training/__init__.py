"""Training: optimizers and the poly schedule, checkpoints with every RNG state, the
``LightningModule`` and ``fit`` with exact resume."""

from __future__ import annotations

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
    "OPTIMIZERS",
    "BudgetFit",
    "PolyLR",
    "build_optimizer",
    "build_scheduler",
    "fit_budget",
    "optim_defaults",
    "optim_settings",
    "parse_duration",
    "poly_factor",
]
