"""``run_planning``: fingerprint a dataset, make its plan, check what preprocessing will need, and
write the plan with its summary and dataset report into the workspace."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..io.atomic import sweep_temporaries
from ..settings import configured
from ..workspace import DatasetWorkspace, Workspace, dataset_lock, default_dataset_name
from .plan import Plan, save_plan
from .planner import make_plan
from .report import write_dataset_report, write_plan_summary
from .settings import (
    PlanSettings,
)


# ============================================================================ planning
@dataclass(frozen=True)
class PlanningResult:
    """What :func:`run_planning` wrote: the plan and the four artefact paths."""

    plan: Plan
    fingerprint: dict[str, Any]
    plans_path: Path
    fingerprint_path: Path
    plan_summary_path: Path
    dataset_report_path: Path

    def paths(self) -> dict[str, str]:
        """The artefact paths as strings (for the API's result and ``--json``)."""
        return {
            "plans_path": str(self.plans_path),
            "fingerprint_path": str(self.fingerprint_path),
            "plan_summary_path": str(self.plan_summary_path),
            "dataset_report_path": str(self.dataset_report_path),
        }

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``plan, plans_path`` (the two values ``run_planning`` returned before)."""
        return iter((self.plan, self.plans_path))


#: preprocessing holds a case's resampled image about this many times over (input, output, the
#: resampler's working copy)
RESAMPLE_MEMORY_FACTOR = 3


def preprocessed_sizes(plan: Plan, fp: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Bytes of each configuration's cache (float32 image channels + uint8 label, every case at the
    configuration's spacing) and of its largest case, from the fingerprint's per-case crops."""
    tr = list(plan.transpose_forward)
    per_voxel = 4 * plan.in_channels + 1
    out: dict[str, dict[str, int]] = {}
    for name, cfg in plan.configurations.items():
        total = largest = 0
        for case in fp.get("cases", []):
            shape = [int(case["shape_after_crop"][a]) for a in tr]
            spacing = [float(case["spacing"][a]) for a in tr]
            target = [float(t) for t in cfg.spacing]
            if not cfg.resample_slices:
                target[0] = spacing[0]
            voxels = int(np.prod([max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target)]))
            total += voxels * per_voxel
            largest = max(largest, voxels * per_voxel)
        out[name] = {"cache_bytes": total, "largest_case_bytes": largest}
    return out


def check_preprocessed_size(plan: Plan, fp: Mapping[str, Any], where: Path) -> dict[str, dict[str, int]]:
    """Refuse a plan with a case that could not be resampled in the available memory at its
    configuration's spacing; warn when all its caches together exceed the free disk of the
    workspace (``where``: preprocessing only some configurations may still fit)."""
    import shutil

    from ..io.limits import available_memory

    sizes = preprocessed_sizes(plan, fp)
    memory = available_memory()
    folder = where
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    shared: dict[str, int] = {}  # configurations on one grid share a cache
    for name, size in sizes.items():
        cfg = plan.configurations[name]
        need = size["largest_case_bytes"] * RESAMPLE_MEMORY_FACTOR
        if need > memory:
            raise ConfigError(
                f"{plan.dataset} {name}: at spacing {_mm(cfg.spacing)} mm the largest case would take "
                f"{_gb(size['largest_case_bytes'])} preprocessed, about {_gb(need)} of memory to resample, "
                f"and {_gb(memory)} is available (all cases: {_gb(size['cache_bytes'])} of cache)",
                hint="plan a coarser target_spacing=[z,y,x] (mm), or leave target_spacing unset",
            )
        shared[cfg.data_identifier or name] = size["cache_bytes"]
    total = sum(shared.values())
    if total > free:
        import logging

        logging.getLogger("segpipe").warning(
            "%s: preprocessing every configuration of this plan would write about %s of caches into %s, "
            "which has %s free (preprocess config=NAME for fewer, or plan a coarser target_spacing)",
            plan.dataset,
            _gb(total),
            folder,
            _gb(free),
        )
    return sizes


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _mm(spacing: Sequence[float]) -> str:
    return "×".join(f"{float(s):.3g}" for s in spacing)


def _check_learnable(fp: dict[str, Any], root: Any) -> None:
    """No foreground in any label map is an error (nothing to learn); a declared class found in no
    case is a warning (the network gets an output it never sees trained)."""
    from ..errors import DatasetError

    classes = {k: v for k, v in fp.get("classes", {}).items() if str(v.get("name", "")).lower() != "ignore"}
    if classes and not any(v.get("voxels") for v in classes.values()):
        raise DatasetError(
            f"{root}: none of the {fp.get('num_cases')} label maps holds any foreground: there is nothing to learn",
            hint="check the label files (exported empty? the wrong files?) with `segpipe check`",
        )
    absent = [f"{k} ({v.get('name')})" for k, v in classes.items() if not v.get("voxels")]
    if absent:
        logging.getLogger("segpipe").warning(
            f"{root}: declared class {', '.join(absent)} is in no label map: the network cannot learn it "
            "(add cases that contain it, or remove it from dataset.json's labels)"
        )


def run_planning(
    dataset: Any,
    workspace: DatasetWorkspace | Workspace | str | os.PathLike[str],
    settings: PlanSettings | None = None,
    *,
    force: bool | None = None,
    num_workers: int | None = None,
    name: str | None = None,
) -> PlanningResult:
    """Fingerprint ``dataset`` (cached), plan it, and write the plan's four artefacts.

    ``workspace`` is the dataset's :class:`~segpipe.workspace.DatasetWorkspace`, or a
    :class:`~segpipe.workspace.Workspace` / work_dir path, in which case the entry is named
    ``name`` (default: ``dataset.name`` in ASCII, :func:`~segpipe.workspace.default_dataset_name`). Before any reading, the workspace is checked writable
    and claimed for this dataset (a different dataset under the same name is refused). Writes,
    each atomically: ``fingerprint.json`` (reused while the dataset is unchanged, unless
    ``force``), ``plans.json``, ``plan_summary.md`` and ``dataset_report.png``.
    """
    force = configured(force, "force")
    from ..fingerprint import fingerprint_dataset
    from ..splits import too_few_for_folds

    if isinstance(workspace, DatasetWorkspace):
        entry = workspace
    else:
        ws = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
        entry = ws.dataset(name or default_dataset_name(str(dataset.name)))
    settings = settings or PlanSettings()
    settings.validate()  # a bad setting fails before the (long) fingerprint, not after it
    entry.workspace.ensure_writable()
    entry.claim(dataset.root, layout=getattr(dataset, "layout", None))
    few = too_few_for_folds(len(dataset.cases)) if dataset.cases else None
    if few:
        logging.getLogger("segpipe").warning(f"{dataset.root}: {few}")
    with dataset_lock(entry, "plan"):
        sweep_temporaries(entry.root)  # a fingerprint or plan a killed run left half-written
        fp = fingerprint_dataset(dataset, entry.fingerprint_path, force=force, num_workers=num_workers)
        _check_learnable(fp, dataset.root)
        plan = make_plan(fp, settings)
        check_preprocessed_size(plan, fp, entry.root)  # before anything of the plan is written
        plans_path = save_plan(plan, entry.plans_path)
        summary_path = write_plan_summary(entry.plan_summary_path, plan, fp, dataset_path=dataset.root)
        report_path = write_dataset_report(entry.dataset_report_path, fp, plan)
    return PlanningResult(
        plan=plan,
        fingerprint=fp,
        plans_path=plans_path,
        fingerprint_path=entry.fingerprint_path,
        plan_summary_path=summary_path,
        dataset_report_path=report_path,
    )
