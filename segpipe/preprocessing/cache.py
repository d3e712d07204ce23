"""The preprocessing cache: :class:`Cache` alone knows its format.

One cache folder per data identifier (configurations on the same grid share it; the workspace
decides where it lives), one folder per case, so no two case ids can share a file name::

    cache/<data identifier>/
      <case>/image.npy         float32 [C, Z, Y, X], memory-mappable
      <case>/label.npy         uint8 / int16 [Z, Y, X]; labelled cases only
      <case>/properties.json   every geometric step (see :func:`~segpipe.preprocessing.preprocess_arrays`),
                               the sources, sampled foreground locations, the cache ``key`` and
                               ``arrays``: per file its shape, dtype, size in bytes and checksum

An entry is written as a whole (a temporary folder renamed into place), so a killed writer leaves
either the old entry or the new one. Before an entry is reused it is validated
(:meth:`Cache.check`): the properties parse and carry the expected key; every array the
properties list is present, has the recorded size, shape and dtype, and the recorded checksum;
a labelled case has its label. An entry that fails is rebuilt, never reused.

The checksum (:func:`sampled_crc32`) is a CRC-32 of the file's first and last MiB plus 14 evenly
spaced 64 KiB blocks between them (the whole file below ~3 MiB), alongside the exact size. It
catches truncated, emptied, replaced and overwritten files; it is not a full integrity check
(a flipped bit between the sampled blocks is missed). Why not the whole file: zlib's CRC-32 runs
at ~1.3 GB/s here, i.e. ~0.1 s per CT-sized case on every reuse, and it would read the whole
cache from disk before each run; the sampled one reads ≤ 3 MiB per file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import DataError, StateError
from ..io import jsonio
from ..io.atomic import atomic_folder, sweep_temporaries
from ..io.datasets import source_files
from .spec import PREPROCESS_VERSION, PreprocessSpec

IMAGE_FILE = "image.npy"
LABEL_FILE = "label.npy"
PROPERTIES_FILE = "properties.json"
EDGE_BLOCK = 1 << 20  # checksummed bytes at each end of a file
MIDDLE_BLOCKS = 14  # evenly spaced blocks between the two ends
MIDDLE_BLOCK = 1 << 16
_UNSAFE_ID = re.compile(r"[/\\\x00]")


def source_stats(paths: Iterable[Path]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        if p.is_dir():  # a DICOM series folder: every file counts
            files = source_files(p)
            st = [(s.st_size, s.st_mtime_ns) for s in (f.stat() for f in files)]
            out.append(
                {
                    "path": str(p),
                    "size": sum(s for s, _ in st),
                    "mtime_ns": max((m for _, m in st), default=0),
                    "files": len(files),
                }
            )
        else:
            s = p.stat()
            out.append({"path": str(p), "size": s.st_size, "mtime_ns": s.st_mtime_ns})
    return out


def cache_key(spec: PreprocessSpec, sources: list[dict[str, Any]], num_classes: int) -> str:
    blob = json.dumps(
        {"v": PREPROCESS_VERSION, "spec": spec.to_dict(), "sources": sources, "classes": num_classes}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def sampled_crc32(path: str | os.PathLike[str], size: int | None = None) -> str:
    """CRC-32 (hex) of the first and last MiB of ``path`` and 14 evenly spaced 64 KiB blocks between."""
    p = Path(path)
    size = p.stat().st_size if size is None else size
    crc = 0
    with open(p, "rb") as f:
        if size <= 2 * EDGE_BLOCK + MIDDLE_BLOCKS * MIDDLE_BLOCK:
            crc = zlib.crc32(f.read(), crc)
        else:
            starts = [0]
            span = size - 2 * EDGE_BLOCK - MIDDLE_BLOCK
            starts += [EDGE_BLOCK + span * (i + 1) // (MIDDLE_BLOCKS + 1) for i in range(MIDDLE_BLOCKS)]
            starts.append(size - EDGE_BLOCK)
            for i, start in enumerate(starts):
                f.seek(start)
                crc = zlib.crc32(f.read(EDGE_BLOCK if i in (0, len(starts) - 1) else MIDDLE_BLOCK), crc)
    return f"{crc:08x}"


def _npy_header(path: Path) -> tuple[tuple[int, ...], str]:
    """(shape, dtype string) from an ``.npy`` header, without reading the data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(int(s) for s in shape), np.dtype(dtype).str


def array_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What :meth:`Cache.check` compares: file name, shape, dtype, size in bytes, checksum."""
    p = Path(path)
    shape, dtype = _npy_header(p)
    size = p.stat().st_size
    return {"file": p.name, "shape": list(shape), "dtype": dtype, "bytes": size, "crc32": sampled_crc32(p, size)}


class Cache:
    """The preprocessing cache of one grid (one data identifier): write, read, validate, list, prune.

    Creating the object touches nothing. Case ids name folders, so an id holding a path separator
    (or ``.``/``..``, or a leading dot, used for temporary folders) is refused.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cache) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @classmethod
    def for_configuration(
        cls, work_dir: str | os.PathLike[str] | None, plan: Any, configuration: str, *, dataset: str | None = None
    ) -> Cache:
        """The cache of ``configuration`` of ``plan`` in the workspace ``work_dir`` (entry ``dataset``,
        default ``plan.dataset``)."""
        from .spec import cache_dir_for

        return cls(cache_dir_for(work_dir, plan, configuration, dataset=dataset))

    # ------------------------------------------------------------------ layout
    def case_dir(self, case_id: str) -> Path:
        cid = str(case_id)
        if not cid or cid in (".", "..") or cid.startswith(".") or _UNSAFE_ID.search(cid):
            raise DataError(
                f"case id {cid!r} cannot name a cache folder",
                hint="rename the case's files (no path separators, no leading dot)",
            )
        return self.root / cid

    def image_path(self, case_id: str) -> Path:
        return self.case_dir(case_id) / IMAGE_FILE

    def label_path(self, case_id: str) -> Path:
        return self.case_dir(case_id) / LABEL_FILE

    def properties_path(self, case_id: str) -> Path:
        return self.case_dir(case_id) / PROPERTIES_FILE

    def cases(self) -> list[str]:
        """Ids of the complete entries (a properties file present), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / PROPERTIES_FILE).is_file()
        )

    def __contains__(self, case_id: object) -> bool:
        return isinstance(case_id, str) and self.properties(case_id) is not None

    # ------------------------------------------------------------------ read
    def properties(self, case_id: str) -> dict[str, Any] | None:
        """The properties of a case, or None when the entry is missing or unreadable."""
        try:
            data = json.loads(self.properties_path(case_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def load(self, case_id: str, *, mmap: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        """(image, label or None, properties) of a case; arrays memory-mapped by default."""
        props = self.properties(case_id)
        if props is None:
            raise StateError(f"{self.root}: case {case_id} is not in the cache", hint="run `segpipe preprocess`")
        mode: Literal["r"] | None = "r" if mmap else None
        try:
            image = np.load(self.image_path(case_id), mmap_mode=mode)
            has_label = (props.get("arrays") or {}).get("label") is not None
            label = np.load(self.label_path(case_id), mmap_mode=mode) if has_label else None
        except (OSError, ValueError, EOFError) as exc:
            raise StateError(
                f"{self.case_dir(case_id)}: cached case {case_id} is damaged ({exc})",
                hint="run `segpipe preprocess` again (it rebuilds damaged entries)",
            ) from None
        return image, label, props

    # ------------------------------------------------------------------ write
    def write(
        self, case_id: str, image: np.ndarray, label: np.ndarray | None, properties: dict[str, Any]
    ) -> dict[str, Any]:
        """Write one entry as a whole (replacing any old one); returns the properties written."""
        target = self.case_dir(case_id)
        with atomic_folder(target) as tmp:
            np.save(tmp / IMAGE_FILE, np.ascontiguousarray(image))
            arrays: dict[str, Any] = {"image": array_record(tmp / IMAGE_FILE), "label": None}
            if label is not None:
                np.save(tmp / LABEL_FILE, np.ascontiguousarray(label))
                arrays["label"] = array_record(tmp / LABEL_FILE)
            props = {**properties, "case": str(case_id), "arrays": arrays}
            (tmp / PROPERTIES_FILE).write_text(jsonio.dumps(props, compact=True), encoding="utf-8")
        return props

    def remove(self, case_id: str) -> None:
        shutil.rmtree(self.case_dir(case_id), ignore_errors=True)

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Remove every entry whose case is not in ``keep`` (cases gone from the dataset), files of
        the earlier flat layout and temporary folders left by killed writers; returns the removed case ids.
        Call it only while no other process writes this cache."""
        if not self.root.is_dir():
            return []
        wanted = set(keep)
        removed = []
        sweep_temporaries(self.root, older_than_s=0)  # no other process writes it: every one is stale
        for p in sorted(self.root.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir():
                if p.name not in wanted:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
            elif p.suffix in (".npy", ".json"):  # <case>.npy / <case>_seg.npy / <case>.json of the flat layout
                p.unlink(missing_ok=True)
        return removed

    # ------------------------------------------------------------------ validate
    def check(self, case_id: str, *, key: str | None = None, labelled: bool | None = None) -> str | None:
        """Why the entry of ``case_id`` cannot be reused, or None when it can.

        ``key``: the expected cache key (plan + sources); ``labelled``: whether the source case has
        a label (a labelled case cached without one is refused, never read as unlabelled).
        """
        props = self.properties(case_id)
        if props is None:
            return "missing" if not self.properties_path(case_id).exists() else f"{PROPERTIES_FILE} unreadable"
        if props.get("version") != PREPROCESS_VERSION:
            return "written by another segpipe version"
        if key is not None and props.get("key") != key:
            return "plan or source files changed"
        arrays = props.get("arrays")
        if not isinstance(arrays, dict) or not isinstance(arrays.get("image"), dict):
            return f"{PROPERTIES_FILE} lists no arrays"
        if labelled is True and arrays.get("label") is None:
            return "cached without its label"
        if labelled is False and arrays.get("label") is not None:
            return "cached with a label the case no longer has"
        for name in ("image", "label"):
            rec = arrays.get(name)
            if rec is None:
                continue
            reason = self._check_array(self.case_dir(case_id) / str(rec.get("file", "")), rec)
            if reason:
                return reason
        return None

    @staticmethod
    def _check_array(path: Path, rec: dict[str, Any]) -> str | None:
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path.name} missing"
        if size != rec.get("bytes"):
            return f"{path.name} is {size} bytes, {rec.get('bytes')} expected (truncated or replaced)"
        try:
            shape, dtype = _npy_header(path)
        except (OSError, ValueError, EOFError) as exc:
            return f"{path.name} has no valid .npy header ({exc})"
        if list(shape) != list(rec.get("shape", [])) or dtype != rec.get("dtype"):
            return f"{path.name} holds {dtype} {list(shape)}, {rec.get('dtype')} {rec.get('shape')} expected"
        if sampled_crc32(path, size) != rec.get("crc32"):
            return f"{path.name} checksum differs (overwritten)"
        return None

    def validate(self, case_ids: Sequence[str] | None = None) -> dict[str, str]:
        """``{case: reason}`` for every listed (default: every cached) case that fails :meth:`check`."""
        out = {}
        for cid in self.cases() if case_ids is None else case_ids:
            reason = self.check(cid)
            if reason:
                out[cid] = reason
        return out


# ---------------------------------------------------------------------------- thin functions
def cached_properties(cache_dir: str | os.PathLike[str], case_id: str) -> dict[str, Any] | None:
    """The properties of a cached case, or None."""
    return Cache(cache_dir).properties(case_id)


def load_cached_case(
    cache_dir: str | os.PathLike[str], case_id: str, *, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(image, label or None, properties) of a cached case; arrays memory-mapped by default."""
    return Cache(cache_dir).load(case_id, mmap=mmap)
