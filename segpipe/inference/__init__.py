"""Inference: the Gaussian-weighted sliding window, flip TTA, fold and configuration ensembles,
post-processing, trained models and model folders, the :class:`Predictor`, and batch prediction."""

from .batch import OUTPUT_FORMATS, InputCase, default_output_dir, discover_inputs, infer_cases
from .model import Member, Model, export_model, load_model_folder, workspace_model
from .postprocess import apply_postprocessing, keep_largest_component
from .predictor import Prediction, Predictor, resolve_device
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
from .tta import FlipTTA, flip_subsets

__all__ = [
    "FLOAT16_WEIGHT_FLOOR",
    "GAUSSIAN_SIGMA_SCALE",
    "GAUSSIAN_VALUE_SCALE",
    "OUTPUT_FORMATS",
    "FlipTTA",
    "InputCase",
    "Member",
    "Model",
    "Prediction",
    "Predictor",
    "SlidingWindowPredictor",
    "apply_postprocessing",
    "default_output_dir",
    "discover_inputs",
    "export_model",
    "flip_subsets",
    "gaussian_importance_map",
    "infer_cases",
    "keep_largest_component",
    "load_model_folder",
    "predict_case_logits",
    "resolve_device",
    "sliding_window_inference",
    "window_starts",
    "workspace_model",
]
