"""DICOM-SEG (binary, fractional and label-map SEG) as a label source.

:func:`read_dicom_seg` turns the segments of a SEG object into one label map on the grid of
the image it belongs to:

* Parsing and decoding use highdicom (``segread``/``get_volume``); the SEG's own voxel grid
  (from its functional groups, sparse or not) is resampled onto the reference image grid with
  nearest-neighbour sampling. Fractional segments are thresholded at 0.5.
* ``reference`` is the image's :class:`~segpipe.geometry.Geometry` (spatial check only) or a
  DICOM path (folder or file). With a path, the series the SEG references
  (ReferencedSeriesSequence) is chosen from it; a series the SEG does not reference, or a
  different FrameOfReferenceUID, is an error.
* Labelled SEG voxels falling outside the reference grid are an error (wrong image), so is a
  SEG without any labelled voxel inside it.
* ``mapping`` maps segments to label values: keys are segment numbers (int or digit strings)
  or SegmentLabels (case-insensitive), values are labels 0..255 (0 drops a segment). Default:
  segment number -> the same value. With a mapping every segment must be mapped, and every key
  must name a segment (typos are errors, not silently empty labels).
* Voxels claimed by segments mapped to different labels are an error unless ``priority`` orders
  them: a list of label values or segment labels, highest priority first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DicomError, UsageError
from ..geometry import Geometry
from .dicom import _quiet_pydicom, _short_error


def _load(seg_path: Path) -> Any:
    import highdicom as hd
    import pydicom

    if not seg_path.is_file():
        raise DicomError(f"{seg_path}: no such file", hint="check the path of the DICOM-SEG file")
    with _quiet_pydicom():
        try:
            ds = pydicom.dcmread(str(seg_path))
        except Exception as exc:  # anything pydicom raises
            raise DicomError(
                f"{seg_path}: not a readable DICOM file ({_short_error(exc)})",
                hint="check the file (it may be truncated or not DICOM)",
            ) from None
        if str(ds.get("Modality", "")) != "SEG":
            raise DicomError(
                f"{seg_path}: not a DICOM-SEG object (modality {ds.get('Modality', 'missing')!r})",
                hint="pass a Segmentation Storage file",
            )
        try:
            return hd.seg.Segmentation.from_dataset(ds, copy=False), ds
        except Exception as exc:  # highdicom validation errors (a truncated file lacks required attributes)
            raise DicomError(
                f"{seg_path}: invalid or truncated DICOM-SEG ({_short_error(exc)})", hint="re-export the segmentation"
            ) from None


def _segments(seg_path: Path, seg: Any) -> dict[int, str]:
    out = {}
    try:
        for n in seg.segment_numbers:
            out[int(n)] = str(seg.get_segment_description(n).segment_label or "")
    except Exception as exc:  # highdicom: a segment description it cannot parse
        raise DicomError(
            f"{seg_path}: invalid segment descriptions ({_short_error(exc)})", hint="re-export the segmentation"
        ) from None
    return out


def _resolve_mapping(
    seg_path: Path, segments: dict[int, str], labelmap: bool, mapping: dict[Any, int] | None
) -> dict[int, int]:
    listing = ", ".join(f"{n}: {lab!r}" for n, lab in segments.items())
    if mapping is None:
        values = {n: n for n in segments}
    else:
        values = {}
        for key, value in mapping.items():
            matches = _find_segments(key, segments)
            if not matches:
                raise DicomError(
                    f"{seg_path}: mapping key {key!r} names no segment (segments: {listing})",
                    hint="use a segment number or SegmentLabel from the list",
                )
            for n in matches:
                values[n] = value
        missing = [n for n in segments if n not in values and not (labelmap and n == 0)]
        if missing:
            raise DicomError(
                f"{seg_path}: segments {missing} are not in the mapping (segments: {listing})",
                hint="map every segment (to 0 to drop it)",
            )
    for n, v in values.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= int(v) <= 255:
            raise UsageError(f"{seg_path}: label value {v!r} for segment {n} is not an integer 0..255")
    return {n: int(v) for n, v in values.items()}


def _find_segments(key: Any, segments: dict[int, str]) -> list[int]:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return [int(key)] if int(key) in segments else []
    text = str(key)
    exact = [n for n, lab in segments.items() if lab == text]
    if exact:
        return exact
    folded = [n for n, lab in segments.items() if lab.lower() == text.lower()]
    if folded:
        return folded
    return [int(text)] if text.isdigit() and int(text) in segments else []


def _reference_geometry(seg_path: Path, ds: Any, reference: Any) -> Geometry:
    if isinstance(reference, Geometry):
        return reference
    from .dicom import dicom_geometry, list_series

    ref_path = Path(reference)
    referenced = [str(item.get("SeriesInstanceUID") or "") for item in ds.get("ReferencedSeriesSequence", [])]
    referenced = [uid for uid in referenced if uid]
    found, _ = list_series(ref_path)
    images = [s for s in found if s.kind == "image"]
    candidates = [s for s in images if s.uid in referenced]
    if not candidates:
        have = "; ".join(s.label() for s in images) or "no image series"
        raise DicomError(
            f"{seg_path}: references series {', '.join(referenced) or '(none)'} which is not in "
            f"{ref_path} (found: {have})",
            hint="pass the folder of the referenced series (or its Geometry to skip the UID check)",
        )
    geometry, chosen = dicom_geometry(ref_path, series=candidates[0].uid, allow_few_slices=True)
    seg_for = str(ds.get("FrameOfReferenceUID") or "")
    if seg_for and chosen.frame_of_reference and seg_for != chosen.frame_of_reference:
        raise DicomError(
            f"{seg_path}: FrameOfReferenceUID {seg_for} differs from the image's "
            f"{chosen.frame_of_reference} ({ref_path})",
            hint="pass the image series the SEG was made on",
        )
    return geometry


def read_dicom_seg(
    seg_path: str | os.PathLike[str],
    reference: Geometry | str | os.PathLike[str],
    *,
    mapping: dict[Any, int] | None = None,
    priority: Sequence[int | str] | None = None,
) -> tuple[np.ndarray, Geometry]:
    """Read a DICOM-SEG as ``(array[1, Z, Y, X] uint8, Geometry)`` on the reference image grid."""
    seg_path = Path(seg_path)
    seg, ds = _load(seg_path)
    geometry = _reference_geometry(seg_path, ds, reference)
    segments = _segments(seg_path, seg)
    labelmap = str(ds.get("SegmentationType", "")) == "LABELMAP"
    values = _resolve_mapping(seg_path, segments, labelmap, mapping)
    try:
        with _quiet_pydicom():
            volume = seg.get_volume(combine_segments=False, segment_numbers=list(segments))
        seg_affine = np.asarray(volume.affine, dtype=float)
        to_seg = np.linalg.inv(seg_affine) @ geometry.index_to_world_matrix
        to_ref = np.linalg.inv(to_seg)
    except Exception as exc:  # highdicom raises ValueError/RuntimeError for odd geometry, numpy LinAlgError
        raise DicomError(
            f"{seg_path}: the SEG frames do not form a regular volume ({_short_error(exc)})",
            hint="re-export the SEG with frames on a regular grid",
        ) from None
    arr = np.asarray(volume.array)
    if arr.ndim == 3:
        arr = arr[..., None]
    fractional = str(ds.get("SegmentationType", "")) == "FRACTIONAL"
    masks = arr > (0.5 if fractional else 0)
    # to_seg: reference index (z, y, x) -> SEG index (s, r, c) through world coordinates; to_ref: back.
    from scipy import ndimage

    planes: dict[int, np.ndarray] = {}
    for ch, n in enumerate(segments):
        value = values.get(n, 0)
        if value == 0:
            continue
        mask = masks[..., ch]
        idx = np.argwhere(mask)
        if len(idx):
            ref_idx = idx @ to_ref[:3, :3].T + to_ref[:3, 3]
            outside = np.any((ref_idx < -0.5) | (ref_idx > np.asarray(geometry.shape) - 0.5), axis=1)
            if outside.any():
                raise DicomError(
                    f"{seg_path}: {int(outside.sum())} voxels of segment {n} ({segments[n]!r}) lie outside "
                    f"the reference image grid {geometry.shape}",
                    hint="the SEG belongs to another image or frame of reference; pass the right series",
                )
        # Pad by one voxel so that coordinates a rounding error beyond the edge still round onto it.
        res = ndimage.affine_transform(
            np.pad(mask.astype(np.uint8), 1),
            to_seg[:3, :3],
            offset=to_seg[:3, 3] + 1,
            output_shape=geometry.shape,
            order=0,
            cval=0,
            mode="constant",
        )
        planes[value] = planes[value] | (res > 0) if value in planes else res > 0
    if not planes or not any(p.any() for p in planes.values()):
        raise DicomError(
            f"{seg_path}: no labelled voxel of the SEG falls on the reference image grid",
            hint="the SEG belongs to another image or is empty",
        )
    order = _priority_order(seg_path, planes, segments, values, priority)
    out = np.zeros(geometry.shape, dtype=np.uint8)
    for value in reversed(order):
        out[planes[value]] = value
    return out[None], geometry


def _priority_order(
    seg_path: Path,
    planes: dict[int, np.ndarray],
    segments: dict[int, str],
    values: dict[int, int],
    priority: Sequence[int | str] | None,
) -> list[int]:
    """Label values, highest priority first; overlapping labels not ordered by ``priority`` are an error."""
    ranked: list[int] = []
    for item in priority or ():
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            ranked_values = [int(item)]
        else:
            ranked_values = [values[n] for n in _find_segments(item, segments) if values.get(n)]
            if not ranked_values:
                raise UsageError(
                    f"{seg_path}: priority entry {item!r} names no segment",
                    hint=f"use label values or segment labels: {sorted(set(values.values()))}",
                )
        ranked.extend(v for v in ranked_values if v not in ranked)
    labels = sorted(planes)
    overlaps = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            count = int(np.count_nonzero(planes[a] & planes[b]))
            if count and not (a in ranked and b in ranked):
                overlaps.append(f"labels {a} and {b} ({count} voxels)")
    if overlaps:
        names = ", ".join(f"{v}={'/'.join(segments[n] for n, val in values.items() if val == v)}" for v in labels)
        raise DicomError(
            f"{seg_path}: overlapping segments: {'; '.join(overlaps)} [{names}]",
            hint="declare a priority order (label values or segment labels, highest first)",
        )
    return [v for v in ranked if v in planes] + [v for v in labels if v not in ranked]


# ---------------------------------------------------------------------------- writing
#: default codes of a segment (SNOMED CT "Anatomical Structure" as both category and type); a
#: dataset's labels can name others in the model (``dicom_seg`` codes)
ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")
#: the algorithm family of segpipe's segments (DICOM CID 7162 "Artificial Intelligence")
ARTIFICIAL_INTELLIGENCE = ("123110", "DCM", "Artificial Intelligence")


def write_dicom_seg(
    path: str | os.PathLike[str],
    label: np.ndarray,
    source: str | os.PathLike[str],
    labels: dict[int, str],
    *,
    dicom_options: dict[str, Any] | None = None,
    software_version: str = "",
    series_description: str = "segpipe segmentation",
    series_number: int = 4242,
) -> Path:
    """Write ``label`` ([Z, Y, X] on the grid :func:`~segpipe.io.image.read_image` gives the DICOM
    ``source`` with ``dicom_options``) as a binary DICOM-SEG referencing the source series.

    Each foreground value of ``labels`` (1..K-1, named) is one segment with that number; empty
    frames are left out. Slice ``z`` of ``label`` is the source frame the reader put there, so a
    series the reader resampled (uneven spacing, gantry tilt) or a multi-frame source has no
    frame-to-slice match and is refused (the NIfTI label map still describes it). Written
    atomically.
    """
    import highdicom as hd
    import pydicom

    from .. import __version__
    from .atomic import atomic_path
    from .dicom import dicom_source_frames

    target = Path(path)
    frames, geometry, resampled = dicom_source_frames(source, **(dicom_options or {}))
    if resampled:
        raise DicomError(
            f"{source}: the series was resampled when read (uneven spacing or gantry tilt), so its slices do not "
            "match the source frames one to one; no DICOM-SEG is written for it",
            hint="use the NIfTI label map, which lies on the resampled grid",
        )
    if any(f.index is not None for f in frames) or len({f.path for f in frames}) != len(frames):
        raise DicomError(
            f"{source}: a multi-frame source series; DICOM-SEG output is written for single-frame series only",
            hint="use the NIfTI label map",
        )
    lab = np.asarray(label)
    if tuple(lab.shape) != tuple(geometry.shape):
        raise UsageError(f"label shape {lab.shape} does not match the DICOM series' grid {geometry.shape}")
    values = sorted(int(v) for v in labels if int(v) > 0)
    if values != list(range(1, len(values) + 1)):
        raise UsageError(f"segment values must be 1..N without gaps, got {values}")
    if lab.size and int(lab.max()) > len(values):
        raise UsageError(f"the label map holds value {int(lab.max())}, beyond the {len(values)} named segments")
    with _quiet_pydicom():
        sources = [pydicom.dcmread(str(f.path), stop_before_pixels=True) for f in frames]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="segpipe",
        version=software_version or __version__,
        family=hd.sr.CodedConcept(*ARTIFICIAL_INTELLIGENCE),
    )
    structure = hd.sr.CodedConcept(*ANATOMICAL_STRUCTURE)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=v,
            segment_label=str(labels[v])[:64],
            segmented_property_category=structure,
            segmented_property_type=structure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for v in values
    ]
    dtype = np.uint8 if len(values) < 256 else np.uint16
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=lab.astype(dtype, copy=False),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="segpipe",
            manufacturer_model_name="segpipe",
            software_versions=software_version or __version__,
            device_serial_number="segpipe",
            series_description=series_description,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomError(
            f"{source}: cannot build a DICOM-SEG for this series ({_short_error(exc)})",
            hint="use the NIfTI label map",
        ) from None
    with atomic_path(target, ext=".dcm") as tmp:
        seg.save_as(str(tmp))
    return target
