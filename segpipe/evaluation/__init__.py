"""Evaluation: Dice per class and case with nnU-Net's rules, summaries (JSON) and per-case tables (CSV)."""

from .metrics import (
    CaseMetrics,
    class_mean_dice,
    confusion_counts,
    dice_from_counts,
    dice_per_class,
    evaluate_case,
    mean_foreground_dice,
    summarize,
    write_case_metrics,
    write_summary,
)

__all__ = [
    "CaseMetrics",
    "class_mean_dice",
    "confusion_counts",
    "dice_from_counts",
    "dice_per_class",
    "evaluate_case",
    "mean_foreground_dice",
    "summarize",
    "write_case_metrics",
    "write_summary",
]
