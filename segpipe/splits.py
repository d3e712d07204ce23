"""Cross-validation splits: nnU-Net v2's five folds and ``splits_final.json`` (the fold count, :data:`N_FOLDS`, is
defined here once)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, StateError, UsageError
from .io.jsonio import write_json
from .workspace import SPLITS_FILE

SPLIT_SEED = 12345
N_FOLDS = 5  # nnU-Net's cross-validation: five folds, each needing at least one validation case


def too_few_for_folds(num_cases: int, n_folds: int = N_FOLDS) -> str | None:
    """What ``num_cases`` labelled cases lack for ``n_folds``-fold cross-validation, or None."""
    if num_cases >= n_folds:
        return None
    return (
        f"{num_cases} labelled case(s): {n_folds}-fold cross-validation needs at least {n_folds} "
        "(one validation case per fold)"
        + ("" if num_cases == 0 else "; with fewer, only fold=all trains (on every case, without validation)")
    )


def make_splits(case_ids: Sequence[str], n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """nnU-Net's cross-validation folds: ``KFold(n_folds, shuffle=True, random_state=seed)`` over the
    sorted ids. sklearn shuffles ``arange(n)`` with ``RandomState(seed)``; fold k's validation set is
    the k-th consecutive chunk, the first ``n % n_folds`` chunks one longer; both lists sorted."""
    ids = sorted(str(c) for c in case_ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise DataError("duplicate case ids in the split input")
    if n_folds < 2 or n < n_folds:
        raise DataError(
            f"cannot make {n_folds} folds from {n} case(s)",
            hint="use fold=all, or add cases (each fold needs at least one validation case)",
        )
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_folds, n // n_folds, dtype=int)
    sizes[: n % n_folds] += 1
    splits, start = [], 0
    for size in sizes:
        val = np.zeros(n, dtype=bool)
        val[order[start : start + size]] = True
        start += size
        splits.append({"train": [ids[i] for i in np.flatnonzero(~val)], "val": [ids[i] for i in np.flatnonzero(val)]})
    return splits


def validate_splits(splits: Any, case_ids: Sequence[str] | None = None, *, where: str = SPLITS_FILE) -> None:
    """Raise :class:`StateError` unless ``splits`` is a non-empty list of {"train": [...], "val": [...]}
    whose ids are all in ``case_ids`` (when given)."""
    fix = f"fix or delete {where} (it is regenerated with nnU-Net's folds)"
    if not isinstance(splits, list) or not splits:
        raise StateError(f"{where}: expected a non-empty list of {{'train': [...], 'val': [...]}}", hint=fix)
    known = set(case_ids) if case_ids is not None else None
    for k, fold in enumerate(splits):
        if not isinstance(fold, dict) or set(fold) != {"train", "val"}:
            keys = sorted(fold) if isinstance(fold, dict) else type(fold).__name__
            raise StateError(f"{where}: fold {k} must have exactly the keys 'train' and 'val' (got {keys})", hint=fix)
        for part in ("train", "val"):
            ids = fold[part]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise StateError(f"{where}: fold {k} '{part}' must be a list of case ids (strings)", hint=fix)
        if not fold["train"]:
            raise StateError(f"{where}: fold {k} has no training cases", hint=fix)
        if known is not None:
            unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
            if unknown:
                more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
                raise StateError(
                    f"{where}: fold {k} names case(s) not in the dataset: {', '.join(unknown[:5])}{more}", hint=fix
                )


def load_or_create_splits(
    path: str | os.PathLike[str], case_ids: Sequence[str], *, n_folds: int = N_FOLDS, seed: int = SPLIT_SEED
) -> list[dict[str, list[str]]]:
    """The splits in ``path`` (``splits_final.json``) when it exists — validated against
    ``case_ids`` — else nnU-Net's folds over ``case_ids`` (the current case list), written there atomically.

    A splits file that names a case no longer in ``case_ids`` (removed from the dataset) is refused
    with a :class:`StateError` naming the cases, not regenerated: folds are what trained models
    and their validation scores refer to, so changing them silently would mix runs trained on
    different folds. Delete the file to get new folds over the current cases. Cases added since the
    file was written are not in any fold until then.
    """
    p = Path(path)
    if p.is_file():
        try:
            splits = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StateError(f"{p}: unreadable splits file ({e})", hint=f"fix or delete {p}") from e
        validate_splits(splits, case_ids, where=str(p))
        return splits
    splits = make_splits(case_ids, n_folds, seed)
    write_json(p, splits)
    return splits


def fold_cases(splits: Sequence[dict[str, list[str]]], fold: int | str) -> tuple[list[str], list[str]]:
    """(train, val) case ids of ``fold`` (an int, or ``"all"``: train = val = every case)."""
    if isinstance(fold, str) and fold.strip().lower() == "all":
        every = sorted({c for f in splits for part in ("train", "val") for c in f[part]})
        return every, list(every)
    try:
        k = int(fold)
    except (TypeError, ValueError):
        k = -1
    if not 0 <= k < len(splits) or (isinstance(fold, float) and fold != k):
        raise UsageError(f"unknown fold {fold!r}", hint=f"choose one of {', '.join(map(str, range(len(splits))))}, all")
    return list(splits[k]["train"]), list(splits[k]["val"])
