"""The image formats segpipe reads and writes, told apart by extension. Below both the image
readers (:mod:`segpipe.io.image`) and the DICOM reader (:mod:`segpipe.io.dicom`), which both need
to know what an image file is named like."""

from __future__ import annotations

import os
import re
from pathlib import Path

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
FORMAT_NAMES = {
    ".nii.gz": "NIfTI (gzip)",
    ".nii": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD (detached header)",
    ".mha": "MetaImage",
    ".mhd": "MetaImage (detached header)",
}


def image_extension(path: str | os.PathLike[str]) -> str | None:
    """The recognised image extension of ``path`` (``'.nii.gz'``, ...) or None."""
    name = str(path).lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


#: nnU-Net's naming of a case's channels: ``<case>_0000``, ``<case>_0001``, … (four digits)
CHANNEL_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def channel_suffix(channel: int) -> str:
    """The suffix naming a case's ``channel`` in nnU-Net's layout: ``_0000`` for the first."""
    return f"_{channel:04d}"


def case_id_of(path: str | os.PathLike[str]) -> str:
    """A case id from a file or folder name: the image (or DICOM file) extension (``.seg.nrrd``
    whole) and a ``_0000`` channel suffix removed."""
    name = Path(path).name
    ext = image_extension(name)
    if ext:
        name = name[: -len(ext)]
        if ext == ".nrrd" and name.lower().endswith(".seg"):  # 3D Slicer's segmentation file: <case>.seg.nrrd
            name = name[: -len(".seg")]
    elif name.lower().endswith((".dcm", ".dicom", ".ima")):
        name = name.rsplit(".", 1)[0]
    m = CHANNEL_NAME.match(name)
    return m["case"] if m else name
