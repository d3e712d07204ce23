"""Inference: the Gaussian-weighted sliding window over whole cases (core function, thin class, plan glue)."""

from .sliding_window import (
    FLOAT16_WEIGHT_FLOOR,
    GAUSSIAN_SIGMA_SCALE,
    GAUSSIAN_VALUE_SCALE,
    SlidingWindowPredictor,
    gaussian_importance_map,
    predict_case_logits,
    sliding_window_inference,
    window_starts,
)

__all__ = [
    "FLOAT16_WEIGHT_FLOOR",
    "GAUSSIAN_SIGMA_SCALE",
    "GAUSSIAN_VALUE_SCALE",
    "SlidingWindowPredictor",
    "gaussian_importance_map",
    "predict_case_logits",
    "sliding_window_inference",
    "window_starts",
]
