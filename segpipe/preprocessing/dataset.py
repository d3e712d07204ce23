"""Preprocess a whole dataset into the cache, in worker processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..settings import configured
from .cache import Cache, cache_key, source_stats
from .resampling import torch_module
from .spec import PreprocessSpec
from .steps import preprocess_arrays


def _worker_init() -> None:
    torch = torch_module()
    torch.set_num_threads(1)


def _preprocess_one(args: tuple[Any, Any, PreprocessSpec, str, str]) -> dict[str, Any]:
    from ..io.datasets import read_case

    case, ds, spec, cache_dir, key = args
    t0 = time.perf_counter()
    data = read_case(case, ds)
    img, lab, props = preprocess_arrays(data.image, data.label, data.geometry, spec, ds.num_classes)
    del data
    if ds.ignore_label is not None:  # unlabelled voxels are no foreground to centre patches on
        props["class_locations"].pop(str(ds.ignore_label), None)
    props.update({"key": key, "sources": source_stats(case.files())})
    Cache(cache_dir).write(case.id, img, lab, props)
    return {"case": case.id, "shape": props["shape_after_resample"], "seconds": time.perf_counter() - t0}


@dataclass
class PreprocessResult:
    cache_dir: str
    processed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    rebuilt: dict[str, str] = field(
        default_factory=dict
    )  # case -> why its entry could not be reused (also in processed)
    removed: list[str] = field(default_factory=list)  # entries of cases no longer in the dataset
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_jobs(todo: list[Any], num_workers: int | None, cdir: Path, desc: str | None = None) -> list[str]:
    """Run ``_preprocess_one`` over ``todo`` (in worker processes); the ids of the cases written."""
    from ..parallel import DEFAULT_HINT, parallel_map

    # segpipe.parallel: at most `num_workers` cases in flight (bounded RAM), single-threaded torch in
    # each worker, a dead worker or Ctrl-C stops the stage at once with one line. torch is imported
    # here before forking so that the workers inherit it instead of each importing it.
    results = parallel_map(
        _preprocess_one,
        todo,
        num_workers=num_workers,
        initializer=_worker_init,
        desc=desc or f"preprocess {cdir.name}",
        names=lambda i: f"case {todo[i][0].id}",
        context=str(cdir),
        hint=f"{DEFAULT_HINT}; finished cases are kept",
        preload=("torch",),
    )
    with closing(results):
        processed = [r["case"] for _, r in results]
    return processed


def preprocess_dataset(
    ds: Any,
    spec: PreprocessSpec,
    cache_dir: str | os.PathLike[str],
    *,
    cases: Sequence[Any] | None = None,
    num_workers: int | None = None,
    force: bool | None = None,
    log: Callable[[str], None] | None = None,
    desc: str | None = None,
) -> PreprocessResult:
    """Preprocess ``cases`` (default: every labelled case) of dataset ``ds`` into ``cache_dir``.

    An entry is reused only when its key (plan + source files' sizes and times) matches and it
    passes :meth:`Cache.check` (arrays present, sizes, shapes, dtypes and checksums as recorded, a
    labelled case with its label); every other entry is rebuilt, and ``rebuilt`` says why. With
    the default case list, entries of cases no longer in the dataset are removed (``removed``).
    Work runs in worker processes with at most ``num_workers`` cases in flight, so at most that
    many cases are in RAM at once.
    """
    force = configured(force, "force")
    t0 = time.perf_counter()
    cache = Cache(cache_dir)
    cdir = cache.root
    cdir.mkdir(parents=True, exist_ok=True)
    todo, result = [], PreprocessResult(str(cdir))
    selected = list(cases if cases is not None else ds.cases)
    for case in selected:
        cache.case_dir(case.id)  # refuses an id that cannot name a folder before any work
        key = cache_key(
            spec, [{k: v for k, v in s.items() if k != "path"} for s in source_stats(case.files())], ds.num_classes
        )
        reason = "forced" if force else cache.check(case.id, key=key, labelled=case.label is not None)
        if reason is None:
            result.reused.append(case.id)
            continue
        if reason not in ("missing", "forced", "plan or source files changed"):
            result.rebuilt[case.id] = reason
        todo.append((case, ds, spec, str(cdir), key))
    if cases is None:
        result.removed = cache.prune(c.id for c in selected)
    if result.rebuilt and log:
        log(
            f"rebuilding {len(result.rebuilt)} damaged cache entr{'y' if len(result.rebuilt) == 1 else 'ies'} in {cdir}: "
            + "; ".join(f"{c}: {r}" for c, r in sorted(result.rebuilt.items())[:5])
            + (f" (+{len(result.rebuilt) - 5} more)" if len(result.rebuilt) > 5 else "")
        )
    if result.removed and log:
        log(
            f"removed {len(result.removed)} cache entr{'y' if len(result.removed) == 1 else 'ies'} of cases no longer "
            f"in the dataset from {cdir}"
        )
    if todo:
        result.processed = _run_jobs(todo, num_workers, cdir, desc)
        if log:
            log(f"preprocessed {len(todo)} case(s) into {cdir}")
    result.processed.sort()
    result.seconds = time.perf_counter() - t0
    return result
