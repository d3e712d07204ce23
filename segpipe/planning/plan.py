"""The plan's data model (:class:`Plan`, :class:`PlanConfig`, :class:`ChannelNormalization`) and its JSON IO."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StateError
from ..io.jsonio import dumps, read_json, write_json
from .settings import PLANS_FILE, SCHEMA_VERSION


# ============================================================================ plan data
@dataclass
class ChannelNormalization:
    channel: int
    name: str
    scheme: str  # one of NORMALIZATION_SCHEMES
    use_mask: bool = False  # zscore inside the nonzero mask (cropping removed much of the image)
    clip: list[float] | None = None  # ct: [p0.5, p99.5] of the foreground
    mean: float | None = None  # ct: dataset-global foreground mean
    std: float | None = None  # ct: dataset-global foreground std

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChannelNormalization:
        return cls(**{k: d[k] for k in (f.name for f in dataclasses.fields(cls)) if k in d})


@dataclass
class PlanConfig:
    """One configuration: what data it runs on and the network that fits the memory budget.

    Per-axis lists are in network axis order (array axes permuted by ``Plan.transpose_forward``).
    ``spacing`` always has 3 values; ``patch_size``, ``strides``, ``kernel_sizes`` have ``dims``.
    For 2D configurations (``resample_slices=False``) axis 0 keeps each case's own spacing and
    ``spacing[0]`` is only the dataset median.
    """

    name: str
    architecture: str  # unet | unet25d | vnet
    dims: int
    spacing: list[float]
    median_shape: list[int]  # median image shape at `spacing` (3 values)
    patch_size: list[int]
    batch_size: int
    strides: list[list[int]]  # per stage; stage 0 is all 1
    kernel_sizes: list[list[int]]
    features: list[int]
    n_conv_encoder: list[int]
    n_conv_decoder: list[int]
    resample_slices: bool = True
    context_slices: int = 0  # 2.5d slab mode: k slices on each side stacked as channels (2k+1 in all)
    attention: bool = False
    batch_dice: bool = False
    estimated_training_bytes: int = 0  # fp32 tensors of one training step at `batch_size`
    estimated_gpu_bytes: int = 0
    data_identifier: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def input_slices(self) -> int:
        """Slices per input sample: ``2 * context_slices + 1`` (1 without a slab)."""
        return 2 * int(self.context_slices) + 1

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def deep_supervision_outputs(self) -> int:
        """Outputs in training: full resolution plus every decoder level but the lowest (nnU-Net)."""
        return max(1, self.num_stages - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["num_stages"] = self.num_stages
        d["deep_supervision_outputs"] = self.deep_supervision_outputs
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        if "context_slices" not in d and int(d.get("input_slices", 1)) > 1:  # plans written before the rename
            d["context_slices"] = (int(d["input_slices"]) - 1) // 2
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Plan:
    dataset: str
    channel_names: dict[str, str]
    labels: dict[str, str]
    transpose_forward: list[int]
    transpose_backward: list[int]
    median_spacing: list[float]  # array order, before transposition
    median_shape: list[int]  # after crop, array order
    target_spacing: list[float]  # 3d_fullres spacing, array order
    anisotropic: bool
    anisotropic_axis: int | None  # array order
    normalization: list[ChannelNormalization]
    configurations: dict[str, PlanConfig]
    settings: dict[str, Any]
    memory_model: dict[str, Any]
    fingerprint_sha256: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # configuration -> why it does not apply
    #: the training data's profile (segpipe.fingerprint.data_profile): what inputs are checked against
    profile: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def ignore_label(self) -> int | None:
        """The value of the label named ``ignore`` (unlabelled voxels: no output, no loss, no metric)."""
        return next((int(v) for v, n in self.labels.items() if str(n).lower() == "ignore"), None)

    @property
    def num_classes(self) -> int:
        """Output channels, background included (the ignore label has none)."""
        return len(self.labels) - (self.ignore_label is not None)

    def previous_stage(self, name: str) -> str | None:
        """The configuration whose prediction ``name`` takes as extra input (the 3-D cascade's
        ``3d_cascade_fullres`` takes ``3d_lowres``'s), else None."""
        return (self.settings.get("cascade") or {}).get(name)

    def previous_channels(self, name: str) -> list[list[int]]:
        """The label values of each extra input channel of ``name`` (a cascade stage): one per
        foreground class, or one per region of a region dataset; empty for other configurations."""
        if not self.previous_stage(name):
            return []
        regions = self.settings.get("regions")
        if self.settings.get("nnunet"):  # nnU-Net's cascade: one channel per foreground label value, regions too
            values = sorted({int(v) for r in regions["regions"] for v in r}) if regions else range(1, self.num_classes)
            return [[int(v)] for v in values]
        if regions:
            return [[int(v) for v in r] for r in regions["regions"]]
        return [[c] for c in range(1, self.num_classes)]

    def network_channels(self, name: str) -> int:
        """Input channels of ``name``'s network per slice: the image's, plus the previous stage's one-hot
        prediction for a cascade stage."""
        return self.in_channels + len(self.previous_channels(name))

    def config(self, name: str) -> PlanConfig:
        if name not in self.configurations:
            raise ConfigError(
                f"configuration {name!r} is not in the plan", hint=f"planned: {', '.join(self.configurations)}"
            )
        return self.configurations[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "channel_names": dict(self.channel_names),
            "labels": dict(self.labels),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "transpose_forward": list(self.transpose_forward),
            "transpose_backward": list(self.transpose_backward),
            "median_spacing": list(self.median_spacing),
            "median_shape": list(self.median_shape),
            "target_spacing": list(self.target_spacing),
            "anisotropic": self.anisotropic,
            "anisotropic_axis": self.anisotropic_axis,
            "normalization": [n.to_dict() for n in self.normalization],
            "configurations": {k: v.to_dict() for k, v in self.configurations.items()},
            "settings": dict(self.settings),
            "memory_model": dict(self.memory_model),
            "fingerprint_sha256": self.fingerprint_sha256,
            "skipped": dict(self.skipped),
            **({"profile": self.profile} if self.profile else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StateError(
                f"plans schema version {version!r} is not supported (this segpipe reads {SCHEMA_VERSION})",
                hint="re-plan the dataset with `segpipe plan DATASET`",
            )
        return cls(
            dataset=d["dataset"],
            channel_names=dict(d["channel_names"]),
            labels=dict(d["labels"]),
            transpose_forward=list(d["transpose_forward"]),
            transpose_backward=list(d["transpose_backward"]),
            median_spacing=list(d["median_spacing"]),
            median_shape=list(d["median_shape"]),
            target_spacing=list(d["target_spacing"]),
            anisotropic=bool(d["anisotropic"]),
            anisotropic_axis=d.get("anisotropic_axis"),
            normalization=[ChannelNormalization.from_dict(n) for n in d["normalization"]],
            configurations={k: PlanConfig.from_dict(v) for k, v in d["configurations"].items()},
            settings=dict(d.get("settings", {})),
            memory_model=dict(d.get("memory_model", {})),
            fingerprint_sha256=d.get("fingerprint_sha256", ""),
            skipped=dict(d.get("skipped", {})),
            profile=dict(d.get("profile") or {}),
            schema_version=version,
        )


def plans_json(plan: Plan) -> str:
    """Canonical text of a plan (:func:`segpipe.io.jsonio.dumps`): the same plan always gives the same bytes."""
    return dumps(plan.to_dict())


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write ``plans.json`` atomically (temp file in the same folder, then ``os.replace``)."""
    return write_json(path, plan.to_dict())


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a ``plans.json`` (or the folder holding one); a missing or broken plan is a StateError."""
    p = Path(path)
    if p.is_dir():
        p = p / PLANS_FILE
    hint = "plan the dataset with `segpipe plan DATASET`"
    data = read_json(p, what="plan", hint=hint)
    try:
        return Plan.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise StateError(
            f"{p}: incomplete plan ({detail})", hint="re-plan with `segpipe plan DATASET force=true`"
        ) from None
