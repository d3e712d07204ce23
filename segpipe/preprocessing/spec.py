"""Preprocessing settings: :class:`ChannelNorm`, :class:`PreprocessSpec` and the spec of a plan configuration."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PREPROCESS_VERSION = 1
SEPARATE_Z_RATIO = 3.0  # nnU-Net's anisotropy threshold for "separate z" resampling
MAX_LOCATIONS_PER_CLASS = 1000  # sampled foreground voxels kept per class (patch centres)
LOCATIONS_SEED = 1234


@dataclass(frozen=True)
class ChannelNorm:
    """How one channel is normalised: ``"ct"``, ``"zscore"``, ``"rescale_to_0_1"``, ``"rgb_to_0_1"``, ``"none"``."""

    scheme: str = "zscore"
    use_mask: bool = False  # zscore: statistics inside the nonzero mask, zero outside
    clip: tuple[float, float] | None = None  # ct: foreground 0.5 / 99.5 percentiles
    mean: float | None = None  # ct: dataset foreground mean
    std: float | None = None  # ct: dataset foreground std

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelNorm:
        clip = d.get("clip")
        return cls(scheme=str(d.get("scheme", "zscore")).lower(), use_mask=bool(d.get("use_mask", False)),
                   clip=tuple(clip) if clip is not None else None, mean=d.get("mean"), std=d.get("std"))


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything preprocessing needs from a plan configuration (plain data)."""

    spacing: tuple[float, float, float]  # target spacing, in transposed axis order
    normalization: tuple[ChannelNorm, ...]
    transpose: tuple[int, int, int] = (0, 1, 2)
    separate_z_ratio: float = SEPARATE_Z_RATIO
    resample_slices: bool = True  # False (2d): axis 0 keeps each case's own spacing, as nnU-Net's 2D

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["normalization"] = [asdict(n) for n in self.normalization]
        return d


def spec_from_plan(plan: Any, configuration: str) -> PreprocessSpec:
    """The :class:`PreprocessSpec` of one configuration of a :class:`~segpipe.planning.Plan`."""
    cfg = plan.config(configuration)
    norms = tuple(ChannelNorm.from_dict(n.to_dict() if hasattr(n, "to_dict") else dict(n)) for n in plan.normalization)
    threshold = float(plan.settings.get("anisotropy_threshold", SEPARATE_Z_RATIO)) if plan.settings else SEPARATE_Z_RATIO
    return PreprocessSpec(spacing=tuple(float(v) for v in cfg.spacing), normalization=norms,
                          transpose=tuple(int(a) for a in plan.transpose_forward), separate_z_ratio=threshold,
                          resample_slices=bool(cfg.resample_slices))


def cache_dir_for(work_dir: str | os.PathLike[str], plan: Any, configuration: str) -> Path:
    """``<work_dir>/<dataset>/cache/<data identifier>``: configurations on the same data share it."""
    cfg = plan.config(configuration)
    return Path(work_dir) / plan.dataset / "cache" / (cfg.data_identifier or configuration)
