"""The preprocessing cache."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StateError
from .spec import PREPROCESS_VERSION, PreprocessSpec


def source_stats(paths: Iterable[Path]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        if p.is_dir():  # a DICOM series folder: every file counts
            files = sorted(f for f in p.rglob("*") if f.is_file())
            st = [(f.stat().st_size, f.stat().st_mtime_ns) for f in files]
            out.append({"path": str(p), "size": sum(s for s, _ in st), "mtime_ns": max((m for _, m in st), default=0),
                        "files": len(files)})
        else:
            s = p.stat()
            out.append({"path": str(p), "size": s.st_size, "mtime_ns": s.st_mtime_ns})
    return out


def cache_key(spec: PreprocessSpec, sources: list[dict[str, Any]], num_classes: int) -> str:
    blob = json.dumps({"v": PREPROCESS_VERSION, "spec": spec.to_dict(), "sources": sources, "classes": num_classes},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_properties(cache_dir: Path, case_id: str) -> dict[str, Any] | None:
    p = cache_dir / f"{case_id}.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_cached_case(cache_dir: Path, case_id: str, *, mmap: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(image, label or None, properties) of a cached case; arrays memory-mapped by default."""
    props = cached_properties(cache_dir, case_id)
    if props is None:
        raise StateError(f"{cache_dir}: case {case_id} is not in the cache", hint="run `segpipe preprocess`")
    mode = "r" if mmap else None
    image = np.load(cache_dir / f"{case_id}.npy", mmap_mode=mode)
    seg_path = cache_dir / f"{case_id}_seg.npy"
    label = np.load(seg_path, mmap_mode=mode) if seg_path.is_file() else None
    return image, label, props
