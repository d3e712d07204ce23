"""Preprocess a whole dataset into the cache, in worker processes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StateError
from ..io.atomic import save_npy, write_text
from .cache import cache_key, cached_properties, source_stats
from .resampling import _torch
from .spec import PreprocessSpec
from .steps import preprocess_arrays


def _worker_init() -> None:
    torch = _torch()
    torch.set_num_threads(1)


def _preprocess_one(args: tuple[Any, Any, PreprocessSpec, str, str]) -> dict[str, Any]:
    from ..io.datasets import read_case

    case, ds, spec, cache_dir, key = args
    t0 = time.perf_counter()
    data = read_case(case, ds)
    img, lab, props = preprocess_arrays(data.image, data.label, data.geometry, spec, ds.num_classes)
    del data
    cdir = Path(cache_dir)
    save_npy(cdir / f"{case.id}.npy", img)
    seg = cdir / f"{case.id}_seg.npy"
    if lab is not None:
        save_npy(seg, lab)
    elif seg.exists():
        seg.unlink()
    props.update({"case": case.id, "key": key, "sources": source_stats(case.files())})
    write_text(cdir / f"{case.id}.json", json.dumps(props, sort_keys=True))  # written last: marks the entry complete
    return {"case": case.id, "shape": props["shape_after_resample"], "seconds": time.perf_counter() - t0}


@dataclass
class PreprocessResult:
    cache_dir: str
    processed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preprocess_dataset(ds: Any, spec: PreprocessSpec, cache_dir: str | os.PathLike[str], *,
                       cases: Sequence[Any] | None = None, num_workers: int | None = None, force: bool = False,
                       log: Callable[[str], None] | None = None) -> PreprocessResult:
    """Preprocess ``cases`` (default: the labelled ones) of dataset ``ds`` into ``cache_dir``.

    Unchanged entries (same key) are reused. Work runs in a process pool with at most
    ``num_workers`` cases in flight, so at most that many cases are in RAM at once.
    """
    t0 = time.perf_counter()
    cdir = Path(cache_dir)
    cdir.mkdir(parents=True, exist_ok=True)
    todo, result = [], PreprocessResult(str(cdir))
    for case in (cases if cases is not None else ds.cases):
        key = cache_key(spec, [{k: v for k, v in s.items() if k != "path"} for s in source_stats(case.files())],
                        ds.num_classes)
        props = cached_properties(cdir, case.id)
        if not force and props is not None and props.get("key") == key and (cdir / f"{case.id}.npy").is_file():
            result.reused.append(case.id)
        else:
            todo.append((case, ds, spec, str(cdir), key))
    workers = max(1, min(num_workers or (os.cpu_count() or 1), len(todo) or 1))
    if todo:
        if workers == 1:
            for job in todo:
                result.processed.append(_preprocess_one(job)["case"])
        else:
            import multiprocessing as mp
            from concurrent.futures.process import BrokenProcessPool

            # fork (as torch's DataLoader): no re-import of __main__, so scripts, notebooks and
            # stdin work; each worker runs single-threaded torch, `workers` of them use the cores.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
                    pending: set[Any] = set()
                    for job in todo:  # keep at most `workers` cases in flight: bounded RAM
                        pending.add(pool.submit(_preprocess_one, job))
                        if len(pending) >= workers:
                            done, pending = wait(pending, return_when=FIRST_COMPLETED)
                            result.processed.extend(f.result()["case"] for f in done)
                    for f in pending:
                        result.processed.append(f.result()["case"])
            except BrokenProcessPool:
                raise StateError(f"{cdir}: a preprocessing worker died (killed, probably out of memory)",
                                 hint="retry with fewer workers, e.g. num_workers=1; finished cases are kept") from None
        if log:
            log(f"preprocessed {len(todo)} case(s) into {cdir}")
    result.processed.sort()
    result.seconds = time.perf_counter() - t0
    return result
