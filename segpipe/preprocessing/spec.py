"""Preprocessing settings: :class:`ChannelNorm`, :class:`PreprocessSpec` and the spec of a plan configuration."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..planning.settings import ANISOTROPY_THRESHOLD

PREPROCESS_VERSION = 2  # 2: one folder per case, arrays recorded (shape, dtype, size, checksum)
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
        return cls(
            scheme=str(d.get("scheme", "zscore")).lower(),
            use_mask=bool(d.get("use_mask", False)),
            clip=tuple(clip) if clip is not None else None,
            mean=d.get("mean"),
            std=d.get("std"),
        )


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything preprocessing needs from a plan configuration (plain data)."""

    spacing: tuple[float, float, float]  # target spacing, in transposed axis order
    normalization: tuple[ChannelNorm, ...]
    transpose: tuple[int, int, int] = (0, 1, 2)
    separate_z_ratio: float = ANISOTROPY_THRESHOLD  # the planner's rule: "separate z" above this spacing ratio
    resample_slices: bool = True  # False (2d): axis 0 keeps each case's own spacing, as nnU-Net's 2D
    #: a model nnU-Net trained: its resampling settings ({"data": ..., "probabilities": ...}, see
    #: :func:`~segpipe.preprocessing.nnunet_resampling.resampling_settings`), and its nonzero mask with holes filled
    nnunet: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["normalization"] = [asdict(n) for n in self.normalization]
        return d


def shared_configuration(plan: Any, configuration: str) -> str:
    """The configuration whose spec builds the cache ``configuration`` uses.

    Configurations with the same ``data_identifier`` lie on the same grid and share one cache, so
    they must preprocess identically: all of them use the spec of the first configuration in the
    plan with that identifier that resamples slices (3-D) — for a 2d configuration the planner
    gives 3d_fullres's identifier only when resampling slices changes no case's shape — else of
    the first one with it.
    """
    cfg = plan.config(configuration)
    ident = cfg.data_identifier
    if not ident:
        return configuration
    same = [name for name, c in plan.configurations.items() if c.data_identifier == ident]
    resampling = [name for name in same if plan.configurations[name].resample_slices]
    return (resampling or same or [configuration])[0]


def spec_from_plan(plan: Any, configuration: str) -> PreprocessSpec:
    """The :class:`PreprocessSpec` of one configuration of a :class:`~segpipe.planning.Plan`
    (configurations sharing a cache share a spec: see :func:`shared_configuration`)."""
    cfg = plan.config(shared_configuration(plan, configuration))
    norms = tuple(ChannelNorm.from_dict(n.to_dict() if hasattr(n, "to_dict") else dict(n)) for n in plan.normalization)
    threshold = float((plan.settings or {}).get("anisotropy_threshold", ANISOTROPY_THRESHOLD))
    sz, sy, sx = (float(v) for v in cfg.spacing)
    t0, t1, t2 = (int(a) for a in plan.transpose_forward)
    nnunet = ((plan.settings or {}).get("nnunet") or {}).get("resampling", {}).get(configuration)
    return PreprocessSpec(
        spacing=(sz, sy, sx),
        normalization=norms,
        transpose=(t0, t1, t2),
        separate_z_ratio=threshold,
        resample_slices=bool(cfg.resample_slices),
        nnunet=dict(nnunet) if nnunet else None,
    )


def cache_dir_for(
    work_dir: str | os.PathLike[str] | None, plan: Any, configuration: str, *, dataset: str | None = None
) -> Path:
    """``<work_dir>/<dataset>/cache/<data identifier>`` (asked of the workspace): configurations on
    the same grid share it. ``dataset``: the workspace entry's name (default ``plan.dataset``)."""
    from ..workspace import Workspace

    cfg = plan.config(configuration)  # a clear error for an unknown name
    entry = Workspace.at(work_dir).dataset(dataset or plan.dataset)
    return entry.cache_dir(cfg.data_identifier or configuration)
