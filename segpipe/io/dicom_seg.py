"""DICOM-SEG (binary, fractional and label-map SEG) as a label source, and segpipe's own as output.

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

:func:`write_dicom_seg` writes a label map on a DICOM series' grid as a binary SEG referencing that
series (highdicom). Type 2 patient and study attributes an anonymised series lacks are written
empty; headers a SEG cannot be made from are a :class:`~segpipe.errors.DicomError` naming the
series and the attribute; a series whose slices do not match its frames one to one, or without
SeriesInstanceUID or FrameOfReferenceUID, gets no SEG (:class:`SegNotSupported`: its label map
describes it alone).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DicomError, UsageError
from ..geometry import Geometry
from .dicom.headers import quiet_pydicom, short_error


def _load(seg_path: Path) -> Any:
    import highdicom as hd
    import pydicom

    if not seg_path.is_file():
        raise DicomError(f"{seg_path}: no such file", hint="check the path of the DICOM-SEG file")
    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(str(seg_path))
        except Exception as exc:  # anything pydicom raises
            raise DicomError(
                f"{seg_path}: not a readable DICOM file ({short_error(exc)})",
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
                f"{seg_path}: invalid or truncated DICOM-SEG ({short_error(exc)})", hint="re-export the segmentation"
            ) from None


def _segments(seg_path: Path, seg: Any) -> dict[int, str]:
    out = {}
    try:
        for n in seg.segment_numbers:
            out[int(n)] = str(seg.get_segment_description(n).segment_label or "")
    except Exception as exc:  # highdicom: a segment description it cannot parse
        raise DicomError(
            f"{seg_path}: invalid segment descriptions ({short_error(exc)})", hint="re-export the segmentation"
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
        with quiet_pydicom():
            volume = seg.get_volume(combine_segments=False, segment_numbers=list(segments))
        seg_affine = np.asarray(volume.affine, dtype=float)
        to_seg = np.linalg.inv(seg_affine) @ geometry.index_to_world_matrix
        to_ref = np.linalg.inv(to_seg)
    except Exception as exc:  # highdicom raises ValueError/RuntimeError for odd geometry, numpy LinAlgError
        raise DicomError(
            f"{seg_path}: the SEG frames do not form a regular volume ({short_error(exc)})",
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
#: attributes of each source slice that a DICOM-SEG copies or references and that must hold a value
#: (type 1). A series whose slices all lack SeriesInstanceUID (read as a synthetic series) or
#: FrameOfReferenceUID (both often removed by anonymisation) gets no SEG but is segmented as usual.
REQUIRED_SOURCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Modality")
#: type 2 attributes of the Patient and General Study modules that a DICOM-SEG copies from its source:
#: anonymised series often lack them, and the standard lets them be present with an empty value, which
#: is how the SEG holds them then
TYPE_2_PATIENT_STUDY_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)
#: the other way to a segmentation of a series whose headers a DICOM-SEG cannot be made from
_NIFTI_INSTEAD = "or convert the series to NIfTI and segment that"


class SegNotSupported(DicomError):
    """A source series segpipe writes no DICOM-SEG for (slices resampled when read, a multi-frame
    series, no SeriesInstanceUID or FrameOfReferenceUID): its label map describes it alone."""


@contextlib.contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """highdicom's progress messages (each copied module) stay out of segpipe's log; its warnings stay in."""
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _slices_without(sources: list[Any], frames: list[Any], attribute: str) -> list[str]:
    """Names of the source files whose ``attribute`` is missing or empty."""
    return [Path(f.path).name for ds, f in zip(sources, frames) if not str(ds.get(attribute, "") or "").strip()]


def _which(names: list[str], total: int) -> str:
    return f"all {total} slices" if len(names) == total else f"{len(names)} of {total} slices ({names[0]}, …)"


def _check_sources(source: str | os.PathLike[str], sources: list[Any], frames: list[Any], slice_step_mm: float) -> None:
    """Refuse source headers a DICOM-SEG cannot be made from, naming the attribute, the slices and the fix.
    Fill in, in memory only (the source files stay as they are), what an anonymised or stripped series
    may lack: its type 2 patient and study attributes, empty; its SliceThickness (type 2 too, but the
    SEG's pixel measures need a value), the step between its slices, which is what a voxel of the
    label map spans."""
    if _slices_without(sources, frames, "SeriesInstanceUID"):
        raise SegNotSupported(
            f"{source}: the slices have no SeriesInstanceUID (read as a synthetic series), which a DICOM-SEG "
            "must reference; no DICOM-SEG is written for it",
            hint="use the label map, or give the series' files one SeriesInstanceUID to get a DICOM-SEG",
        )
    if len(_slices_without(sources, frames, "FrameOfReferenceUID")) == len(sources):
        raise SegNotSupported(
            f"{source}: the slices have no FrameOfReferenceUID (anonymisation often removes it), which a "
            "DICOM-SEG must share with the images it segments; no DICOM-SEG is written for it",
            hint="use the label map, or give the series' files one FrameOfReferenceUID to get a DICOM-SEG",
        )
    for attribute in REQUIRED_SOURCE_ATTRIBUTES:
        lacking = _slices_without(sources, frames, attribute)
        if lacking:
            raise DicomError(
                f"{source}: {_which(lacking, len(sources))} have no {attribute} (missing or empty), which a "
                "DICOM-SEG needs from the series it segments",
                hint=f"give the series' files their {attribute}, {_NIFTI_INSTEAD}",
            )
    try:
        # highdicom keeps its table of SOP classes private; without it, its own error names the class
        from highdicom._standard_utils import get_sop_class_iod_map  # noqa: PLC2701
    except ImportError:  # pragma: no cover - another highdicom layout: its own error names the class
        known = None
    else:
        known = get_sop_class_iod_map()
    if known is not None:
        for sop_class in sorted({str(ds.SOPClassUID) for ds in sources}):
            if sop_class not in known:
                lacking = [Path(f.path).name for ds, f in zip(sources, frames) if str(ds.SOPClassUID) == sop_class]
                raise DicomError(
                    f"{source}: {_which(lacking, len(sources))} have SOPClassUID {sop_class}, not a standard "
                    "image storage class a DICOM-SEG can reference",
                    hint=f"give the series' files the SOPClassUID of their image type (CT Image Storage is "
                    f"1.2.840.10008.5.1.4.1.1.2, MR Image Storage 1.2.840.10008.5.1.4.1.1.4), {_NIFTI_INSTEAD}",
                )
    for ds in sources:
        for attribute in TYPE_2_PATIENT_STUDY_ATTRIBUTES:
            if attribute not in ds:
                setattr(ds, attribute, None)  # present and empty, as a type 2 attribute may be
        if not str(ds.get("SliceThickness", "") or "").strip():
            ds.SliceThickness = f"{slice_step_mm:.6g}"


def _character_set(sources: list[Any]) -> Any:
    """The DICOM-SEG's SpecificCharacterSet: the source's, except that one code-extension term alone
    (``ISO 2022 IR 13``, which some scanners write) becomes its plain equivalent (``ISO_IR 13``): with
    a single value no escape sequence may switch sets, so both encode the same bytes, and highdicom
    takes code-extension terms only among several values."""
    from highdicom.enum import SpecificCharacterSetValues

    value = sources[0].get("SpecificCharacterSet")
    values = [value] if isinstance(value, str) else list(value or [])
    if not any(str(v).strip() for v in values):
        return None  # present but empty (a type 1C attribute left blank): the default repertoire, ASCII
    prefix = "ISO 2022 IR "
    if len(values) == 1 and str(values[0]).startswith(prefix):
        number = str(values[0])[len(prefix) :]
        if number == "6":
            return None  # the default repertoire (ASCII): no SpecificCharacterSet
        plain = f"ISO_IR {number}"
        if plain in {v.value for v in SpecificCharacterSetValues}:
            return plain
    return value


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
    regions: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Write ``label`` ([Z, Y, X] on the grid :func:`~segpipe.io.image.read_image` gives the DICOM
    ``source`` with ``dicom_options``) as a binary DICOM-SEG referencing the source series.

    Each foreground value of ``labels`` (1..K-1, named) is one segment with that number; empty
    frames are left out. Slice ``z`` of ``label`` is the source frame the reader put there, so a
    series the reader resampled (uneven spacing, gantry tilt), a multi-frame source or a series
    without SeriesInstanceUID or FrameOfReferenceUID has no DICOM-SEG (:class:`SegNotSupported`; the
    label map still describes it). Type 2 patient and study attributes the source lacks (an anonymised
    series without PatientBirthDate, say) are written empty, as the standard allows, and a missing
    SliceThickness is taken as the step between slices; source headers a DICOM-SEG
    cannot be made from (an empty SOPClassUID, no StudyInstanceUID, a value highdicom refuses) are a
    :class:`~segpipe.errors.DicomError` naming the series and the attribute. Written atomically.

    ``regions`` (a region model's label values per region): one segment per region instead, named
    by ``labels[1..R]``, each the voxels holding one of its values (segments may overlap).
    """
    target = Path(path)
    frames, geometry = _single_frame_series(source, dicom_options)
    lab = np.asarray(label)
    values = _segment_values(lab, geometry, labels, any_value=regions is not None)
    if regions is not None:
        if len(regions) != len(values):
            raise UsageError(f"{len(regions)} regions but {len(values)} segment names")
        lab = np.stack([np.isin(lab, list(r)) for r in regions], axis=-1)  # [Z, Y, X, R]: overlapping segments
    sources = _source_headers(source, frames)
    _check_sources(source, sources, frames, float(geometry.spacing[0]))
    seg = _segmentation(
        source,
        sources,
        lab,
        labels,
        values=values,
        software_version=software_version,
        series_description=series_description,
        series_number=series_number,
    )
    _save_seg(source, seg, target)
    return target


def _single_frame_series(
    source: str | os.PathLike[str], dicom_options: dict[str, Any] | None
) -> tuple[list[Any], Geometry]:
    """The frames and grid of the DICOM series ``source`` as the reader gives it, refusing a series it
    resampled or a multi-frame one (its slices do not match the source frames one to one)."""
    from .dicom import dicom_source_frames

    frames, geometry, resampled = dicom_source_frames(source, **(dicom_options or {}))
    if resampled:
        raise SegNotSupported(
            f"{source}: the series was resampled when read (uneven spacing or gantry tilt), so its slices do not "
            "match the source frames one to one; no DICOM-SEG is written for it",
            hint="use the label map, which lies on the resampled grid",
        )
    if any(f.index is not None for f in frames) or len({f.path for f in frames}) != len(frames):
        raise SegNotSupported(
            f"{source}: a multi-frame source series; DICOM-SEG output is written for single-frame series only",
            hint="use the label map",
        )
    return frames, geometry


def _segment_values(
    lab: np.ndarray, geometry: Geometry, labels: dict[int, str], *, any_value: bool = False
) -> list[int]:
    """The segment numbers of the named foreground labels (1..N), refusing a label map off the series'
    grid, gaps in the numbering and (unless ``any_value``: regions name the segments) values beyond
    the named segments."""
    if tuple(lab.shape) != tuple(geometry.shape):
        raise UsageError(f"label shape {lab.shape} does not match the DICOM series' grid {geometry.shape}")
    values = sorted(int(v) for v in labels if int(v) > 0)
    if values != list(range(1, len(values) + 1)):
        raise UsageError(f"segment values must be 1..N without gaps, got {values}")
    if not any_value and lab.size and int(lab.max()) > len(values):
        raise UsageError(f"the label map holds value {int(lab.max())}, beyond the {len(values)} named segments")
    return values


def _source_headers(source: str | os.PathLike[str], frames: list[Any]) -> list[Any]:
    """The header of each source slice, read again (pixels left out) for the DICOM-SEG to reference."""
    import pydicom

    sources = []
    with quiet_pydicom():
        for f in frames:
            try:
                sources.append(pydicom.dcmread(str(f.path), stop_before_pixels=True))
            except Exception as exc:  # anything pydicom raises: the file changed since it was read
                raise DicomError(
                    f"{source}: cannot read the header of {f.path} again to write the DICOM-SEG ({short_error(exc)})",
                    hint="leave the series' files unchanged while segpipe runs, and run the same command again",
                ) from None
    return sources


def _segmentation(
    source: str | os.PathLike[str],
    sources: list[Any],
    lab: np.ndarray,
    labels: dict[int, str],
    *,
    values: list[int],
    software_version: str,
    series_description: str,
    series_number: int,
) -> Any:
    """The binary DICOM-SEG (highdicom) of the label map ``lab`` on the source slices, one segment per
    value, refusing header values highdicom cannot make one from."""
    import highdicom as hd

    from .._version import __version__

    try:
        with quiet_pydicom(), _quiet_highdicom():
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
            return hd.seg.Segmentation(
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
                specific_character_set=_character_set(sources),
            )
    except Exception as exc:  # whatever highdicom raises about a header value it refuses
        raise DicomError(
            f"{source}: cannot make a DICOM-SEG from the series' headers ({short_error(exc)})",
            hint=f"correct that value in the series' files, {_NIFTI_INSTEAD}",
        ) from None


def _save_seg(source: str | os.PathLike[str], seg: Any, target: Path) -> None:
    """Write the DICOM-SEG ``seg`` to ``target`` atomically."""
    from .atomic import atomic_path

    with atomic_path(target, ext=".dcm") as tmp:
        try:
            with quiet_pydicom():
                seg.save_as(str(tmp))
        except OSError:
            raise  # a full or read-only disk is the batch's concern, not this series'
        except Exception as exc:  # pydicom refusing to encode a value copied from the source
            raise DicomError(
                f"{source}: cannot write the DICOM-SEG of this series ({short_error(exc)})",
                hint=f"correct that value in the series' files, {_NIFTI_INSTEAD}",
            ) from None
