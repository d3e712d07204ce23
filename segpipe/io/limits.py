"""What an image file can hold, checked before a voxel is allocated and after a file is written:
the size a header declares against the file (or what its compressed stream can expand to) and the
available memory; a header's grid turned into a :class:`~segpipe.geometry.Geometry` or refused; a
written image read back to its end."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ReadError
from ..geometry import Geometry, GeometryError

# Deflate (the compression of .nii.gz and of gzip-encoded NRRD/MetaImage data) never expands
# more than 1032:1 (zlib's documented limit), so n compressed bytes hold at most 1032·n bytes.
DEFLATE_MAX_RATIO = 1032
# An image is refused when its voxels would need more than this share of the available memory.
MEMORY_SHARE = 0.8


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_declared_size(
    p: Path,
    shape: tuple[int, ...],
    dtype: np.dtype,
    components: int,
    stream: tuple[str, int] | None,
    *,
    check_memory: bool = True,
    memory_bytes: int | None = None,
) -> None:
    """Refuse, before anything is allocated, a header declaring more voxels than the file or the memory can hold.

    ``shape`` is the header's size in the file's own axis order; ``stream`` is ``("raw", bytes)``
    for uncompressed data or ``("deflate", bytes)`` for the most a compressed stream can expand
    to; ``memory_bytes`` is what reading needs in memory (default: the stored size).
    """
    n_vox = 1
    for s in shape:
        n_vox *= int(s)
    stored = n_vox * int(components) * int(dtype.itemsize)
    size = "(" + ", ".join(str(int(s)) for s in shape) + ")"
    what = f"{p}: the header declares size {size} of {dtype.name}{'' if components == 1 else f' × {components}'} ({format_bytes(stored)})"
    if stream is not None:
        kind, limit = stream
        if stored > limit:
            if kind == "raw":
                holds = f"the file holds only {format_bytes(limit)} of voxel data"
            else:
                holds = f"its {format_bytes(limit / DEFLATE_MAX_RATIO)} of compressed data can expand to at most {format_bytes(limit)}"
            raise ReadError(
                f"{what}, but {holds}", hint="the file is truncated or its header is damaged; re-export or replace it"
            )
    if check_memory:
        need = stored if memory_bytes is None else memory_bytes
        available = available_memory()
        if need > MEMORY_SHARE * available:
            raise ReadError(
                f"{what}, but reading it needs {format_bytes(need)} and only {format_bytes(available)} of memory is available",
                hint="free memory (fewer workers, close other programs) or crop/downsample the image; "
                "if the size is wrong, the header is damaged: re-export the file",
            )


def valid_geometry(p: Path, build: Callable[[], Geometry]) -> Geometry:
    """``build()``, with an impossible grid (zero/NaN spacing, NaN origin, ...) reported as a ReadError on ``p``."""
    try:
        return build()
    except GeometryError as exc:
        detail = exc.message.removeprefix("Geometry.")
        raise ReadError(
            f"{p}: the header describes an impossible voxel grid ({detail})",
            hint="correct the voxel spacing/orientation in the header, or re-export the image",
        ) from None


def check_written(tmp: Path, target: Path, ext: str, data_bytes: int) -> None:
    """Raise ``OSError`` unless ``tmp`` holds the whole image.

    SimpleITK's NIfTI writer reports a failed write (a full disk, a quota) only on stderr and
    returns normally, leaving a short file that would be renamed into place as a finished result:
    a compressed file is read to its end (a truncated gzip stream fails), an uncompressed one must
    hold at least the voxel bytes.
    """
    import gzip
    import shutil

    problem = None
    if ext.endswith(".gz"):
        try:
            with gzip.open(tmp, "rb") as f:
                total = 0
                while chunk := f.read(1 << 22):
                    total += len(chunk)
            if total < data_bytes:
                problem = f"holds {total} of at least {data_bytes} bytes"
        except (OSError, EOFError) as exc:
            problem = f"is incomplete ({exc})"
    elif ext == ".nii" or not tmp.stat().st_size:
        size, need = tmp.stat().st_size, data_bytes
        if ext == ".nii" and size >= 4:  # the voxels start at the header's vox_offset
            with open(tmp, "rb") as f:
                head = f.read(176)
            sizeof_hdr = struct.unpack("<i", head[:4])[0]
            if sizeof_hdr == 348 and len(head) >= 112:
                need += int(struct.unpack("<f", head[108:112])[0])
            elif sizeof_hdr == 540 and len(head) >= 176:
                need += int(struct.unpack("<q", head[168:176])[0])
        if size < need:
            problem = f"holds {size} of at least {need} bytes"
    if problem is None:
        return
    if shutil.disk_usage(tmp.parent).free < data_bytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    raise OSError(errno.EIO, f"the image written {problem}", str(target))
