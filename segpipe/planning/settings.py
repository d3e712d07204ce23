"""Planner constants and :class:`PlanSettings` (validated from a plain mapping)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..settings import group_defaults
from ..workspace import PLANS_FILE as PLANS_FILE  # re-exported: the name lives in workspace.py

SCHEMA_VERSION = 1
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres", "2.5d", "vnet")
ARCHITECTURES = ("unet", "unet25d", "vnet")
NORMALIZATION_SCHEMES = ("ct", "zscore", "none", "rescale_to_0_1", "rgb_to_0_1")

# The planner's defaults are written once, in conf/planner/default.yaml (what `segpipe plan`
# composes); PlanSettings() and the constants below read them from there.
_DEFAULTS = group_defaults("planner")

# nnU-Net constants
# The anisotropy rule's threshold: the coarsest spacing is "anisotropic" above this many times the
# others. The one definition (conf/planner/default.yaml): the planner's default, and what
# preprocessing (separate resampling of the coarse axis) imports.
ANISOTROPY_THRESHOLD = float(_DEFAULTS["anisotropy_threshold"])
FEATURE_MAP_MIN_EDGE = 4
INITIAL_PATCH_VOLUME_3D = 256**3
INITIAL_PATCH_VOLUME_2D = 2048**2
LOWRES_THRESHOLD = float(_DEFAULTS["lowres_threshold"])
LOWRES_SPACING_STEP = 1.03
LOWRES_MIN_VOXEL_RATIO = 2.0
MASK_NORM_THRESHOLD = 0.75
MIN_STAGES = 3  # MONAI DynUNet needs ≥ 3 stages; tiny images get a (padded) patch that allows them
NEAR_ISOTROPIC_25D = 1.25  # 2.5d goes 3D once the spacing ratio is ≤ this (Wang et al.; nnU-Net uses 2)

# GPU memory model: bytes on the card ≈ FIXED + weight state + SLACK × AMP factor × activations.
# Calibrated once on an NVIDIA H200 (torch 2.11, cuDNN benchmark mode, fp16 autocast) with
# `segpipe.networks.measure_training_bytes` over 16 planned configurations (hippocampus-, 0.7×0.7×5 mm-
# and 200×400×400 CT-like fingerprints; 2d/3d_fullres/3d_lowres/2.5d/vnet): fp32 saved tensors matched
# the model exactly; autocast kept 52-57% of them; CUDA context + peak *reserved* memory was at most
# 1.0× the prediction for the configurations that fill 8 GiB (0.99-1.01× for CT-like 3D) and 0.5-0.9×
# for small ones (the fixed part dominates there).
GPU_FIXED_BYTES = int(1.0 * 2**30)  # CUDA context (0.6 GiB measured), cuDNN/cuBLAS workspace, the batch
GPU_SLACK = 1.55  # transient activation gradients during backward, allocator rounding and caching
AMP_ACTIVATION_FACTOR = 0.55  # fp16 autocast stores conv/norm/activation outputs in half precision
FLOAT_BYTES = 4


# ============================================================================ settings
@dataclass
class PlanSettings:
    """Planner knobs (``conf/planner/*.yaml``). Build from a plain dict with :meth:`from_mapping`."""

    # Defaults: conf/planner/default.yaml (the comments there describe each knob).
    gpu_memory_gb: float = float(_DEFAULTS["gpu_memory_gb"])
    configurations: list[str] | None = _DEFAULTS["configurations"]  # None: every applicable configuration
    target_spacing: list[float] | None = _DEFAULTS["target_spacing"]  # (z, y, x) mm; None: from data
    base_features: int = _DEFAULTS["base_features"]
    max_features_3d: int = _DEFAULTS["max_features_3d"]
    max_features_2d: int = _DEFAULTS["max_features_2d"]
    vnet_base_features: int = _DEFAULTS["vnet_base_features"]
    vnet_max_features: int = _DEFAULTS["vnet_max_features"]
    min_batch_size: int = _DEFAULTS["min_batch_size"]
    max_dataset_fraction: float = _DEFAULTS["max_dataset_fraction"]
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD
    lowres_threshold: float = LOWRES_THRESHOLD
    amp: bool = _DEFAULTS["amp"]
    attention_25d: bool = _DEFAULTS["attention_25d"]
    context_slices: int = _DEFAULTS["context_slices"]  # 2.5d: 0 = Wang's hybrid; k > 0: 2k+1 slices
    normalization: dict[str, str] | None = _DEFAULTS["normalization"]  # channel index or name -> scheme

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> PlanSettings:
        """Validate a plain mapping (e.g. Hydra's ``planner`` group); unknown keys/values → ConfigError.

        Every key must be a planner setting: run options (``force``, ``num_workers``, ``work_dir``)
        are the caller's to honour and are refused here rather than silently dropped.
        ``configurations`` may be a list or a string (``"3d_fullres"``, ``"3d_fullres,2d"``).
        """
        data = {str(k): v for k, v in dict(data or {}).items()}
        unknown = sorted(set(data) - set(cls.fields()))
        if unknown:
            close = did_you_mean(unknown[0], cls.fields())
            raise ConfigError(
                f"unknown planner setting(s) {', '.join(unknown)}",
                hint=(f"did you mean {' or '.join(close)}? " if close else "")
                + f"valid settings: {', '.join(cls.fields())}",
            )
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data or data[f.name] is None:
                continue
            values[f.name] = _convert(f.name, data[f.name], f.default)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"planner setting {name}={getattr(self, name)!r}: {why}")

        if not (self.gpu_memory_gb > 0 and math.isfinite(self.gpu_memory_gb)):
            raise bad("gpu_memory_gb", "must be a positive number of GB")
        if self.configurations is not None:
            if not self.configurations:
                raise bad("configurations", f"empty; choose from {', '.join(CONFIGURATIONS)} or null for all")
            for c in self.configurations:
                if c not in CONFIGURATIONS:
                    close = did_you_mean(c, CONFIGURATIONS)
                    raise ConfigError(
                        f"unknown configuration {c!r} in planner setting configurations",
                        hint=(f"did you mean {' or '.join(close)}? " if close else "")
                        + f"valid: {', '.join(CONFIGURATIONS)} (a list, or one name, or names "
                        "separated by commas)",
                    )
        if self.target_spacing is not None and (len(self.target_spacing) != 3 or min(self.target_spacing) <= 0):
            raise bad("target_spacing", "needs 3 positive values (z, y, x) in mm")
        for name in (
            "base_features",
            "max_features_3d",
            "max_features_2d",
            "vnet_base_features",
            "vnet_max_features",
            "min_batch_size",
        ):
            if getattr(self, name) < 1:
                raise bad(name, "must be ≥ 1")
        if not 0 < self.max_dataset_fraction <= 1:
            raise bad("max_dataset_fraction", "must be in (0, 1]")
        if self.anisotropy_threshold <= 1:
            raise bad("anisotropy_threshold", "must be > 1")
        if not 0 < self.lowres_threshold < 1:
            raise bad("lowres_threshold", "must be in (0, 1)")
        if self.context_slices < 0:
            raise bad("context_slices", "must be ≥ 0")
        for key, scheme in (self.normalization or {}).items():
            if scheme not in NORMALIZATION_SCHEMES:
                raise ConfigError(
                    f"normalization for channel {key!r}: unknown scheme {scheme!r}",
                    hint=f"valid: {', '.join(NORMALIZATION_SCHEMES)}",
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` distinct choices close to ``name`` (best first), for "did you mean …?" hints."""
    unique = list(dict.fromkeys(str(c) for c in choices))
    return difflib.get_close_matches(str(name), unique, n=n)


def _split_text(text: str) -> list[str]:
    """``"a,b"``, ``"a b"``, ``"[a, b]"`` or ``"'a'"`` → ``["a", "b"]`` (CLI and API strings)."""
    inner = text.strip()
    if inner[:1] in "[(" and inner[-1:] in "])":
        inner = inner[1:-1]
    return [part.strip().strip("'\"").strip() for part in re.split(r"[,\s]+", inner)]


def _names(value: Any) -> list[str]:
    """Configuration names from a string (one name, or several separated by commas) or a list.

    A plain string is never iterated character by character: ``"3d_fullres"`` is one name.
    List items may themselves hold comma-separated names. Repeats are dropped, order kept.
    """
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError
        out.extend(part for part in _split_text(item) if part)
    return list(dict.fromkeys(out))


def _convert(name: str, value: Any, default: Any) -> Any:
    """Coerce one setting (Hydra gives ListConfig/DictConfig, CLI strings) or raise ConfigError."""
    try:
        if name == "configurations":
            return _names(value)
        if name == "target_spacing":
            if isinstance(value, str):
                items: list[Any] = [v for v in _split_text(value) if v]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                items = [value] * 3  # one number: isotropic
            else:
                items = list(value)
            if any(isinstance(v, bool) for v in items):
                raise TypeError
            return [float(v) for v in items]
        if name == "normalization":
            return {str(k): str(v).lower() for k, v in dict(value).items()}
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise TypeError
        if isinstance(default, int):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
    except (TypeError, ValueError):
        kind = {
            "configurations": "a list of configuration names",
            "target_spacing": "a list of 3 numbers",
            "normalization": "a mapping channel -> scheme",
        }.get(name, {"bool": "true or false", "int": "a whole number", "float": "a number"}.get(type(default).__name__))
        raise ConfigError(f"planner setting {name}={value!r} is not {kind}") from None
    return value
