"""Evaluation metrics: Dice (nnU-Net's rules), HD95 and normalised surface Dice, per case and summarised
(folder evaluation and ``find-best`` are workflows: :mod:`segpipe.workflows`)."""

from .metrics import (
    CaseMetrics,
    class_mean_dice,
    confusion_counts,
    dice_from_counts,
    dice_per_class,
    evaluate_case,
    evaluate_regions,
    mean_foreground_dice,
    summarize,
    write_case_metrics,
    write_summary,
)
from .surface import (
    DEFAULT_TOLERANCE_MM,
    hd95,
    normalized_surface_dice,
    surface_distances,
    surface_metrics_per_class,
)

__all__ = [
    "DEFAULT_TOLERANCE_MM",
    "CaseMetrics",
    "class_mean_dice",
    "confusion_counts",
    "dice_from_counts",
    "dice_per_class",
    "evaluate_case",
    "evaluate_regions",
    "hd95",
    "mean_foreground_dice",
    "normalized_surface_dice",
    "summarize",
    "surface_distances",
    "surface_metrics_per_class",
    "write_case_metrics",
    "write_summary",
]
