"""The data model of a dataset: :class:`Dataset` of :class:`Case` records, a case read
(:class:`CaseData`), and a problem found in one (:class:`Finding`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DatasetError
from ...geometry import Geometry

LAYOUTS = ("msd", "nnunet", "case-folder")


@dataclass(frozen=True)
class Case:
    """One case: an id, its channel sources, an optional label source."""

    id: str
    images: tuple[Path, ...]
    label: Path | None = None

    def files(self) -> list[Path]:
        return [*self.images, *([self.label] if self.label is not None else [])]


IGNORE_LABEL = "ignore"  # the label name of unlabelled voxels (nnU-Net's convention)


@dataclass
class Dataset:
    """A discovered dataset: description plus labelled (``cases``) and unlabelled cases."""

    name: str
    root: Path
    layout: str
    channel_names: dict[int, str]
    labels: dict[int, str]
    cases: list[Case]
    test_cases: list[Case] = field(default_factory=list)
    dimension: int = 3
    channels_in_one_file: bool = False  # MSD: all modalities in one 4-D file
    dicom_options: dict[str, Any] = field(default_factory=dict)
    seg_mapping: dict[str, int] | None = None
    seg_priority: list[Any] | None = None
    #: nnU-Net's region-based training (dataset.json labels whose values are lists, and
    #: ``regions_class_order``): ``{"names": [...], "regions": [[label values], ...], "class_order": [...]}``
    regions: dict[str, Any] | None = None

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of label values including background (and the ignore label, if any)."""
        return max(self.labels) + 1

    @property
    def ignore_label(self) -> int | None:
        """The value of the label named ``ignore`` (unlabelled voxels), or None."""
        return next((v for v, n in self.labels.items() if n.lower() == IGNORE_LABEL), None)

    def all_cases(self) -> list[Case]:
        return [*self.cases, *self.test_cases]

    def case(self, case_id: str) -> Case:
        for c in self.all_cases():
            if c.id == case_id:
                return c
        raise DatasetError(f"{self.root}: no case {case_id!r}", hint="run `segpipe check` to list the cases")

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": str(self.root),
            "layout": self.layout,
            "channels": {str(k): v for k, v in self.channel_names.items()},
            "labels": {str(k): v for k, v in self.labels.items()},
            **({"regions": self.regions} if self.regions else {}),
            "num_training": len(self.cases),
            "num_test": len(self.test_cases),
        }


@dataclass
class CaseData:
    """The voxels of one case: image [C, Z, Y, X] float32, label [Z, Y, X] integer or None."""

    case: Case
    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry


@dataclass(frozen=True)
class Finding:
    """One problem found in a case (``severity`` is ``"error"`` or ``"warning"``)."""

    case: str
    file: str
    problem: str
    message: str
    fix: str
    severity: str = "error"

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)

    def line(self) -> str:
        return f"{self.case}: {self.file}: {self.message} (fix: {self.fix})"
