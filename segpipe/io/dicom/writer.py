"""Writing an array as a simple single-frame CT/MR series (one file per slice)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ...geometry import Geometry
from ..atomic import atomic_folder

SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def _stored_values(array: np.ndarray, rescale: bool) -> tuple[np.ndarray, float, float]:
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    integral = arr.dtype.kind in "iu" or (
        arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    )
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if integral and lo >= -32768 and hi <= 32767:
        return arr.astype(np.int16), 1.0, 0.0
    if integral and lo >= 0 and hi <= 65535:
        return arr.astype(np.uint16), 1.0, 0.0
    if not rescale:
        raise UsageError(f"values {lo:g}..{hi:g} do not fit 16-bit integers", hint="pass rescale=True")
    if not np.all(np.isfinite(arr)):
        raise UsageError("array has non-finite values; DICOM cannot store them")
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.clip(np.rint((arr.astype(np.float64) - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, lo


def write_dicom_series(
    folder: str | os.PathLike[str],
    array_zyx: np.ndarray,
    geometry: Geometry,
    *,
    modality: str = "CT",
    series_description: str = "segpipe",
    patient_id: str = "SEGPIPE",
    patient_name: str = "SEGPIPE^DEMO",
    rescale: bool = True,
    series_number: int = 1,
    study_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> Path:
    """Write ``array_zyx`` as a single-frame series (one file per slice) into ``folder`` atomically.

    Slices are written along the geometry's z axis (which must be perpendicular to the slices).
    Integer data fitting 16 bits are stored as they are (slope 1, intercept 0); anything else needs
    ``rescale=True`` and is stored as uint16 with RescaleSlope/RescaleIntercept (floats are then
    quantised to 1/65535 of their range). An existing ``folder`` is replaced.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    modality = modality.upper()
    if modality not in SOP_CLASSES:
        raise UsageError(
            f"write_dicom_series: modality {modality!r} not supported", hint=f"use one of {sorted(SOP_CLASSES)}"
        )
    arr = np.asarray(array_zyx)
    if arr.shape != geometry.shape:
        raise UsageError(f"write_dicom_series: array shape {arr.shape} does not match geometry {geometry.shape}")
    d = geometry.direction_matrix
    r, c, z = d[:, 0], d[:, 1], d[:, 2]
    if abs(np.dot(np.cross(r, c), z)) < 1 - 1e-6:
        raise UsageError(
            "write_dicom_series: geometry z axis is not perpendicular to the slices",
            hint="resample to an orthogonal grid first",
        )
    stored, slope, intercept = _stored_values(arr, rescale)
    target = Path(folder)
    study = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_ref = frame_of_reference_uid or generate_uid()
    today = datetime.datetime.now()
    with atomic_folder(target) as tmp:
        for k in range(arr.shape[0]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = UID(SOP_CLASSES[modality])
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.SeriesDescription, ds.SeriesNumber = modality, series_description, series_number
            ds.PatientID, ds.PatientName = patient_id, patient_name
            ds.PatientBirthDate = ds.PatientSex = ds.ReferringPhysicianName = ds.AccessionNumber = ""
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = today.strftime("%Y%m%d")
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = today.strftime("%H%M%S")
            ds.StudyID, ds.Manufacturer, ds.ImageType = "1", "segpipe", ["DERIVED", "SECONDARY", "AXIAL"]
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame_ref
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{v:.6f}" for v in geometry.index_to_world(np.array([k, 0, 0]))]
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([r, c])]
            ds.PixelSpacing = [f"{geometry.spacing[1]:.8g}", f"{geometry.spacing[2]:.8g}"]
            ds.SliceThickness = ds.SpacingBetweenSlices = f"{geometry.spacing[0]:.8g}"
            ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    return target
