"""`segpipe check`: read every case once and report every problem, with case and file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .data.splits import too_few_for_folds
from .io.datasets import Dataset, Finding, check_case_ids, inspect_case, load_dataset

#: the ``case`` of a finding about the whole dataset rather than one case
DATASET_WIDE = "(dataset)"


@dataclass
class CheckReport:
    dataset: dict[str, Any]
    cases_checked: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def cases_with_errors(self) -> list[str]:
        return sorted({f.case for f in self.errors if f.case != DATASET_WIDE})

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "cases_checked": self.cases_checked,
            "ok": self.ok,
            "cases_with_errors": self.cases_with_errors,
            "findings": [f.to_dict() for f in self.findings],
        }


def _inspect_findings(ds: Dataset, case: Any) -> list[Finding]:
    return inspect_case(case, ds)[1]


def check_dataset(
    dataset: str | os.PathLike[str] | Dataset, *, num_workers: int | None = None, include_test: bool = True
) -> CheckReport:
    """Read every case of ``dataset`` once, on :mod:`segpipe.parallel`'s worker processes.

    Processes rather than threads: a case that exhausts memory kills one worker (a clear error
    naming the case) instead of the whole command, and pure-Python parsing runs in parallel.
    """
    from .parallel import parallel_list

    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    check_case_ids(ds.all_cases(), ds.root)  # load_dataset did so already; a Dataset built by hand did not
    cases = ds.all_cases() if include_test else list(ds.cases)
    findings: list[Finding] = []
    per_case = parallel_list(
        partial(_inspect_findings, ds),
        cases,
        num_workers=num_workers,
        desc="check",
        names=lambda i: f"case {cases[i].id}",
        context=str(ds.root),
        first_in_parent=True,
    )
    for result in per_case:  # input order: deterministic report
        findings.extend(result)
    few = too_few_for_folds(len(ds.cases))
    if few:
        findings.append(
            Finding(
                DATASET_WIDE,
                "dataset.json",
                "too_few_cases",
                few,
                "add labelled cases" + (" (or train with fold=all)" if ds.cases else ""),
                # nothing at all is an error; unlabelled cases alone can still be segmented
                "warning" if ds.all_cases() else "error",
            )
        )
    return CheckReport(ds.summary(), len(cases), findings)
