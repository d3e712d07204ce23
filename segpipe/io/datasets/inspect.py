"""Reading one case of a dataset: :func:`inspect_case` reads it and lists every problem found in
it; :func:`read_case` does the same but raises on the first error, so bad data never reaches
anything expensive."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import DataError, DicomError, SegpipeError
from ...geometry import Geometry
from ..image import is_dicom_source, read_header, read_image
from ..nifti import header_warnings
from .model import Case, CaseData, Dataset, Finding


def _read_source(
    path: Path, ds: Dataset, reference: Geometry | None = None, *, is_label: bool = False
) -> tuple[np.ndarray, Geometry]:
    if is_label and path.suffix.lower() == ".dcm" and reference is not None:
        from ..dicom_seg import read_dicom_seg

        return read_dicom_seg(path, reference, mapping=ds.seg_mapping, priority=ds.seg_priority)
    if is_dicom_source(path):
        return read_image(path, **ds.dicom_options)
    return read_image(path)


def _stored_2d(path: Path) -> bool:
    """A file of two dimensions, or a DICOM image: not a volume of one slice."""
    if is_dicom_source(path):
        return True
    try:
        return read_header(path).dimension < 3
    except SegpipeError:
        return True


def _rel(path: Path, ds: Dataset) -> str:
    try:
        return str(path.relative_to(ds.root))
    except ValueError:
        return str(path)


class _Findings(list):
    """The problems found in one case, each added with the file it concerns."""

    def __init__(self, case: Case, ds: Dataset):
        super().__init__()
        self.case, self.ds = case, ds

    def add(self, path: Path, problem: str, message: str, fix: str, severity: str = "error") -> None:
        self.append(Finding(self.case.id, _rel(path, self.ds), problem, message, fix, severity))

    @property
    def errors(self) -> bool:
        return any(f.severity == "error" for f in self)


def inspect_case(case: Case, ds: Dataset) -> tuple[CaseData | None, list[Finding]]:
    """Read one case and list every problem in it; the data is None when an error was found."""
    findings = _Findings(case, ds)
    for path in case.files():
        for warning in header_warnings(path):
            findings.add(
                path,
                "header_disagreement",
                warning,
                "make both describe the same grid (e.g. nibabel: img.set_qform(img.get_sform())) and re-save",
                severity="warning",
            )
    arrays, geometry = _read_images(case, ds, findings)
    image = None
    if arrays and not findings.errors:
        image = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
        _check_voxels(case, image, findings)
    label = _read_label(case, ds, geometry, findings) if case.label is not None else None
    if findings.errors or image is None or geometry is None:
        return None, list(findings)
    return CaseData(case, image.astype(np.float32, copy=False), label, geometry), list(findings)


def _read_images(case: Case, ds: Dataset, findings: _Findings) -> tuple[list[np.ndarray], Geometry | None]:
    """The case's image files read (a 2-D or one-slice image in a 3-D dataset, a channel off the first
    one's grid and a wrong channel count are findings), and the first one's grid."""
    add = findings.add
    arrays: list[np.ndarray] = []
    geometry: Geometry | None = None
    for path in case.images:
        try:
            arr, geo = _read_source(path, ds)
        except SegpipeError as exc:
            problem = "dicom_refused" if isinstance(exc, DicomError) else "unreadable"
            add(path, problem, exc.message, exc.hint or "re-export or replace the file")
            continue
        if geo.shape[0] == 1 and ds.dimension == 3:
            if is_dicom_source(path):  # one DICOM image: most often a series with its other slices missing
                add(
                    path,
                    "wrong_dimension",
                    f"1 slice (shape {geo.shape[1:]}): a single DICOM image, where the 3-D model needs a volume",
                    "provide the whole series (every slice of it)",
                )
            elif _stored_2d(path):
                add(
                    path,
                    "wrong_dimension",
                    f"2-D image (shape {geo.shape[1:]}) in a 3-D dataset",
                    "provide the 3-D volume",
                )
            elif case.label is not None:  # a volume of one slice segments (padded), but is no 3-D training case
                add(path, "wrong_dimension", f"1 slice (shape {geo.shape}) in a 3-D dataset", "provide the 3-D volume")
        if geometry is None:
            geometry = geo
        else:
            first = case.images[0]
            names = (path.name, first.name) if path.name != first.name else ("this channel", "first channel")
            diff = geo.differences(geometry, names=names)
            if diff:
                add(
                    path,
                    "geometry_mismatch",
                    f"grid differs from channel file {_rel(first, ds)}: {'; '.join(diff)}",
                    "resample all channels onto one grid",
                )
        arrays.append(arr)
    if len(arrays) == len(case.images) and arrays:
        n = sum(a.shape[0] for a in arrays)
        if n != ds.num_channels:
            add(
                case.images[0],
                "missing_channels",
                f"{n} channel(s) found, dataset declares {ds.num_channels}",
                "provide every channel of channel_names/modality (or fix the declaration)",
            )
    return arrays, geometry


def _check_voxels(case: Case, image: np.ndarray, findings: _Findings) -> None:
    """NaN or infinite voxels (an error), and a blank or constant channel (a warning)."""
    finite = np.isfinite(image)
    if not finite.all():
        bad = int(image.size - np.count_nonzero(finite))
        findings.add(
            case.images[0],
            "nan_inf",
            f"{bad} NaN/inf voxel(s)",
            "repair the image (e.g. replace NaN by the background value)",
        )
        return
    for c in range(image.shape[0]):
        lo, hi = float(image[c].min()), float(image[c].max())
        if lo == hi:
            what = "empty (all zero)" if lo == 0 else f"constant ({lo:g})"
            findings.add(
                case.images[min(c, len(case.images) - 1)],
                "empty_image" if lo == 0 else "constant_image",
                f"channel {c} is {what}",
                "check the export; remove the case if the image is blank",
            )


def _read_label(case: Case, ds: Dataset, geometry: Geometry | None, findings: _Findings) -> np.ndarray | None:
    """The case's label map (integers of the dataset's declared values, on the image's grid), or
    None with findings saying why."""
    add = findings.add
    assert case.label is not None
    try:
        read_label, lgeo = _read_source(case.label, ds, geometry, is_label=True)
    except SegpipeError as exc:
        add(case.label, "unreadable", exc.message, exc.hint or "re-export or replace the label")
        return None
    if read_label.shape[0] != 1:
        add(
            case.label,
            "wrong_dimension",
            f"label has {read_label.shape[0]} channels/volumes",
            "store the label as one 3-D map",
        )
    elif geometry is not None:
        diff = lgeo.differences(geometry, names=("label", "image"))
        if diff:
            add(
                case.label,
                "geometry_mismatch",
                f"label grid differs from image {_rel(case.images[0], ds)}: {'; '.join(diff)}",
                "resample the label onto the image grid (nearest neighbour) or fix its header",
            )
    lab: np.ndarray = read_label[0]
    if not np.issubdtype(lab.dtype, np.integer):
        finite = np.isfinite(lab)
        if not finite.all() or not np.array_equal(lab[finite], np.round(lab[finite])):
            add(case.label, "label_values", "label has non-integer or NaN values", "store the label as integers")
            return None
        lab = lab.astype(np.int64)
    values = np.unique(lab)
    undeclared = [int(v) for v in values if int(v) not in ds.labels]
    if undeclared:
        add(
            case.label,
            "label_values",
            f"label values {undeclared} are not declared (declared {sorted(ds.labels)})",
            "fix the label map or declare the values in dataset.json",
        )
    elif values.size == 1 and int(values[0]) == 0:
        add(
            case.label,
            "empty_label",
            "label has no foreground",
            "fine for negative cases; check otherwise",
            severity="warning",
        )
    dtype = np.uint8 if ds.num_classes <= 256 else np.int32
    return lab.astype(dtype, copy=False)


def read_case(case: Case, ds: Dataset) -> CaseData:
    """Read a case, raising :class:`DataError` naming the case, file and fix on the first problem."""
    data, findings = inspect_case(case, ds)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        f = errors[0]
        more = f" (+{len(errors) - 1} more; run `segpipe check`)" if len(errors) > 1 else ""
        lead = f.message.split(": ", 1)[0]
        where = "" if lead.endswith(str(f.file)) else f"{f.file}: "  # the reader's message may name the file
        raise DataError(f"case {f.case}: {where}{f.message}{more}", hint=f.fix)
    assert data is not None
    return data
