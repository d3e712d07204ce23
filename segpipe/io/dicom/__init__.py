"""Reading DICOM image series (and writing simple ones) with validation before trust.

A folder is scanned recursively, **headers only**; DICOMDIR files (any byte order) are
skipped and every object is grouped by SeriesInstanceUID (a series whose SOP instances occur in
several folders, i.e. copies, is split per folder). Files without a SeriesInstanceUID (some
anonymisers remove it) are grouped by the tags that remain (folder, StudyInstanceUID,
SeriesNumber, SeriesDescription, Modality, SOP class, FrameOfReferenceUID, rows/columns and
orientation) into a *synthetic* series with a ``synthetic-…`` UID and a warning, then validated as
usual. SEG, RTSTRUCT, SR, presentation states and other objects without pixel rows/columns are
listed but never read as images; secondary captures are listed but only read when selected
explicitly (by ``series``, or by passing the file itself). A file that cannot be read or described is skipped with its reason (``skipped`` and
``skipped_reasons`` of :func:`describe_dicom`); it never stops the listing of the others.

Choosing the series (:func:`read_dicom` options):

* ``series``: a SeriesInstanceUID (exact), a case-insensitive glob matched against the whole
  SeriesDescription (``"t1*"`` matches ``T1post`` and ``T1pre_reg``, not ``T2_reg``; without
  wildcards it is an exact, case-insensitive match), or, with the prefix ``re:``, a
  case-insensitive regular expression searched in the SeriesDescription (``"re:^t1(?!.*reg)"``);
  ``modality``: e.g. ``"CT"`` (case-insensitive glob).
* Without a selector the only image series present is read; several candidates are an error
  in one line naming how many, their descriptions and how to choose (``series=``);
  :func:`describe_dicom` lists them (UID, modality, description, size, files: ``segpipe info FOLDER``).

Validation, computed from ImagePositionPatient / ImageOrientationPatient / PixelSpacing (the
per-frame and shared functional groups for enhanced and legacy-converted multi-frame objects),
never from optional tags alone. Slices are sorted by their position along the slice normal
``n = row × column`` (not by InstanceNumber), so array index z grows along ``n``:

1. all slices have the same rows/columns/samples (else *mixed sizes*), the same orientation
   (cosines within 1e-3) and the same pixel spacing (0.1 %); the pixel spacing is positive and
   the orientation is two unit vectors at a right angle;
2. slice positions are unique (else *duplicate positions*: several volumes in one series);
3. one slice is a single-slice volume (one without position and PixelSpacing, an ultrasound
   image say, gets 1 mm pixels and a warning); two slices are refused unless ``allow_few_slices=True``;
4. every slice origin lies on the line through the first one along ``n``: an in-plane offset of
   more than 0.1 pixel between slices is a *gantry tilt* (detected geometrically; the tilt tag
   is not needed). Refused unless ``allow_gantry_tilt=True``, which resamples (linearly) onto a
   regular grid aligned with the slices, widened in-plane to cover every slice;
5. the steps between slices along ``n`` are uniform: every slice lies within
   ``spacing_tolerance`` (relative, default 0.02 = 2 % of the mean step) of a regular grid. The
   reference series in the test data deviate by at most 2e-4 (rounding of DS positions), a
   missing slice by 100 %: 2 % leaves room for scanner jitter and still catches every gap. A missing slice is reported with the gap; ``allow_uneven_spacing=True``
   resamples linearly onto a regular grid with the median step, spanning first to last slice.
   Voxels a resampling cannot fill get the series minimum.

Pixel data are decoded by pydicom's handlers (GDCM / pylibjpeg / pyjpegls: JPEG baseline and
lossless, JPEG-LS, JPEG 2000, RLE; 12-bit JPEG Extended needs pylibjpeg-libjpeg). pydicom's log
messages and warnings are silenced while reading; a decoding failure is one
:class:`~segpipe.errors.DicomError` naming the file, the transfer syntax and the decoder to install
(a vendor's private syntax, which no decoder reads: how to convert the series).
Rescale slope/intercept (per file or per frame) is applied:
float32 output when any slope/intercept is not integral, else an integer dtype wide enough
(the stored dtype, int16, int32 or int64, the first that holds the data). RGB data give three
channels. Errors are :class:`~segpipe.errors.DicomError` with one line naming the path and the
problem, and a ``fix:`` hint. MONOCHROME1 data are returned as stored (not inverted), as ITK does.

Parts (everything is importable from ``segpipe.io.dicom``):

* :mod:`.headers`: one header read quietly (pydicom's logging and warnings silenced), the image
  planes it describes (:class:`Frame`, per-frame functional groups included);
* :mod:`.discovery`: which files and folders are DICOM (:func:`looks_like_dicom`), the recursive
  scan into series (:class:`DicomSeries`, :func:`list_series`; synthetic series, copies split per
  folder, skip reasons) and :func:`unique_suffixes` for listing UIDs;
* :mod:`.selection`: the series selector (UID, glob, ``re:``, modality) and :func:`choose_series`;
* :mod:`.validation`: the geometric checks and the voxel grid (:func:`plan_series`, :class:`ReadPlan`);
* :mod:`.pixels`: decoding (with the decoder to install when it fails), rescale, and the resampling
  behind ``allow_gantry_tilt`` / ``allow_uneven_spacing``;
* :mod:`.reader`: the entry points :func:`read_dicom`, :func:`dicom_geometry` and :func:`describe_dicom`;
* :mod:`.writer`: :func:`write_dicom_series` (single-frame CT/MR series).
"""

from __future__ import annotations

from .discovery import (
    DICOM_SUFFIXES,
    DICOMDIR_SOP_CLASS,
    MAX_SKIP_EXAMPLES,
    MAX_SNIFFED_FILES,
    NON_IMAGE_MODALITIES,
    NON_IMAGE_SOP_PREFIXES,
    SECONDARY_CAPTURE_PREFIX,
    SKIP_BAD_HEADER,
    SKIP_BY_NAME,
    SKIP_DICOMDIR,
    SKIP_EXPLANATIONS,
    SKIP_SUFFIXES,
    SKIP_UNREADABLE,
    SYNTHETIC_PREFIX,
    DicomSeries,
    list_series,
    looks_like_dicom,
    unique_suffixes,
)
from .headers import Frame
from .reader import READ_OPTIONS, describe_dicom, dicom_geometry, dicom_source_frames, read_dicom
from .selection import REGEX_PREFIX, choose_series
from .validation import (
    ORIENTATION_ATOL,
    PIXEL_SPACING_RTOL,
    TILT_PIXEL_FRACTION,
    ReadPlan,
    plan_series,
)
from .writer import SOP_CLASSES, write_dicom_series

__all__ = [
    "DICOMDIR_SOP_CLASS",
    "DICOM_SUFFIXES",
    "DicomSeries",
    "Frame",
    "MAX_SKIP_EXAMPLES",
    "MAX_SNIFFED_FILES",
    "NON_IMAGE_MODALITIES",
    "NON_IMAGE_SOP_PREFIXES",
    "ORIENTATION_ATOL",
    "PIXEL_SPACING_RTOL",
    "READ_OPTIONS",
    "REGEX_PREFIX",
    "ReadPlan",
    "SECONDARY_CAPTURE_PREFIX",
    "SKIP_BAD_HEADER",
    "SKIP_BY_NAME",
    "SKIP_DICOMDIR",
    "SKIP_EXPLANATIONS",
    "SKIP_SUFFIXES",
    "SKIP_UNREADABLE",
    "SOP_CLASSES",
    "SYNTHETIC_PREFIX",
    "TILT_PIXEL_FRACTION",
    "choose_series",
    "describe_dicom",
    "dicom_geometry",
    "dicom_source_frames",
    "list_series",
    "looks_like_dicom",
    "plan_series",
    "read_dicom",
    "unique_suffixes",
    "write_dicom_series",
]
