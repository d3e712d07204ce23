"""Dataset discovery: MSD, nnU-Net v2 raw and case-folder layouts.

:func:`load_dataset` recognises the layout from ``dataset.json``, validates the description
(types, duplicate case ids, missing files, paths escaping the dataset folder) and returns a
:class:`Dataset` of :class:`Case` records. :func:`inspect_case` reads one case and lists every
problem found in it; :func:`read_case` does the same but raises on the first error — the
stages after ``check`` use it, so bad data never reaches anything expensive.

Layouts
-------
* **MSD** (Medical Segmentation Decathlon): ``dataset.json`` with ``modality``, ``labels``
  (``"0": "background"``), ``training`` (``[{"image": ..., "label": ...}]``) and ``test``.
  Several modalities live in one 4-D file.
* **nnU-Net v2 raw**: ``dataset.json`` with ``channel_names``, ``labels`` (name → value),
  ``file_ending``, ``numTraining``; ``imagesTr/CASE_0000.ext`` (one file per channel),
  ``labelsTr/CASE.ext``, optional ``imagesTs/``. Region labels (``regions_class_order``) are
  refused with a clear message. A label named ``ignore`` (nnU-Net's convention: the highest
  value) marks unlabelled voxels: they count in no loss and no metric, and the network has no
  output for them.
* **case-folder**: ``dataset.json`` with ``"layout": "case-folder"``, ``channel_names``,
  ``labels``, ``image`` (a file name, a list of names — one per channel — or a DICOM series
  folder name) and optionally ``label`` (a NIfTI/NRRD/MHA file or a DICOM-SEG ``.dcm``),
  ``cases`` (default: every sub-folder), ``dicom`` (series selector and read options, see
  :mod:`segpipe.io.dicom`), ``seg_mapping``/``seg_priority`` for DICOM-SEG labels. Each
  case is ``DATASET/<case>/`` holding those files; a case folder without the label file is
  an unlabelled (test) case.

Every path stays inside the dataset folder: ``../`` and absolute paths in a description are
refused, and so is a file or folder that is a link leading outside it, unless the description
says ``"external_links": true`` (datasets assembled from links into shared storage).
"""

from .inspect import inspect_case, read_case
from .layouts import CACHE_SUFFIXES, check_case_ids, load_dataset, source_files
from .model import IGNORE_LABEL, LAYOUTS, Case, CaseData, Dataset, Finding

__all__ = [
    "CACHE_SUFFIXES",
    "IGNORE_LABEL",
    "LAYOUTS",
    "Case",
    "CaseData",
    "Dataset",
    "Finding",
    "check_case_ids",
    "inspect_case",
    "load_dataset",
    "read_case",
    "source_files",
]
