"""Typed settings records, each built from ``conf/`` by one ``from_conf()``: the defaults written
there, then a composed group's values, then keyword overrides (None keeps what is below it). The
functions of the library take these records, so none holds a default of its own that ``conf/``
also holds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .conf import group_defaults


def _merged(group: str, values: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(group_defaults(group))
    for source in (values or {}), overrides:
        merged.update({k: v for k, v in source.items() if v is not None})
    return merged


@dataclass(frozen=True)
class DicomOptions:
    """How a DICOM series is chosen and read (``conf/dicom/default.yaml``; see :mod:`segpipe.io.dicom`)."""

    series: str | None
    modality: str | None
    allow_uneven_spacing: bool
    allow_few_slices: bool
    allow_gantry_tilt: bool
    spacing_tolerance: float

    @classmethod
    def from_conf(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> DicomOptions:
        merged = _merged("dicom", values, overrides)
        return cls(**{f.name: merged[f.name] for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InferSettings:
    """How ``infer`` segments (``conf/infer/default.yaml``): the folds and checkpoint of the model,
    flip test-time augmentation, the sliding window's overlap, window mode and batch, the device, the networks'
    runtime and precision, the int8 quantisation an export adds, the output format, whether class
    probabilities and the batch's report are written too, and whether an input unlike the training data fails."""

    folds: Any
    checkpoint: str
    tta: bool
    overlap: float
    window: str
    batch_size: int | None
    device: str
    runtime: str
    precision: str
    quantize: str | None
    quantize_tolerance: float
    format: str
    probabilities: bool
    report: bool
    strict: bool

    @classmethod
    def from_conf(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> InferSettings:
        merged = _merged("infer", values, overrides)
        return cls(**{f.name: merged[f.name] for f in fields(cls)})
