"""Atomic writes: nothing half-written is ever left behind.

Every artefact segpipe writes (images, JSON, NPY caches, DICOM series, dataset folders) goes
to a temporary name in the target's own folder and is renamed over the target once complete
(``os.replace`` is atomic within a file system). On any error the temporary is removed and
the target is left as it was.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def _tmp_name(target: Path, ext: str) -> Path:
    base = target.name[: len(target.name) - len(ext)] if ext else target.name
    return target.with_name(f".{base}.tmp-{uuid.uuid4().hex[:8]}{ext}")


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, ext: str | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it over ``path`` on success.

    The temporary keeps the target's extension (``ext``, default its last suffix) so writers
    that pick the format by extension (SimpleITK, ``np.save``) behave as for the target.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    ext = ext if ext is not None else "".join(target.suffixes[-1:])
    tmp = _tmp_name(target, ext)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        for leftover in (tmp, tmp.with_suffix(".raw"), tmp.with_suffix(".zraw")):
            leftover.unlink(missing_ok=True)
        raise


#: a temporary older than this belongs to a writer that was killed (segpipe's writes take seconds)
STALE_TEMPORARY_S = 3600.0


def sweep_temporaries(folder: str | os.PathLike[str], *, older_than_s: float = STALE_TEMPORARY_S) -> list[str]:
    """Remove the temporaries (``.<name>.tmp-…``) a killed writer left in ``folder`` (not below it),
    if older than ``older_than_s``: a live writer's own temporaries are younger. Returns their names."""
    import time

    root = Path(folder)
    if not root.is_dir():
        return []
    now = time.time()
    removed = []
    for p in sorted(root.iterdir()):
        if not (p.name.startswith(".") and ".tmp-" in p.name):
            continue
        try:
            if now - p.lstat().st_mtime < older_than_s:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
        except OSError:
            continue
    return removed


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """``np.save`` to ``path`` atomically."""
    with atomic_path(path, ext=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (an existing
    folder there is swapped out and removed), on failure it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target, "")
    tmp.mkdir()
    try:
        yield tmp
        old: Any = None
        if target.exists():
            old = _tmp_name(target, ".old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
