"""The API's ``demo``: the main job on the embedded synthetic datasets, and
``generate_demo_data`` to write those datasets alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import DEMO_SCHEDULE
from ..settings import configured
from .common import PathLike, composed, paths_checked
from .data import check, plan, preprocess
from .prediction import evaluate, infer
from .training import train


@paths_checked
def generate_demo_data(out: PathLike, *, force: bool | None = None, seed: int = 0, dicom: bool = False) -> Path:
    """Write the embedded synthetic demo dataset to ``out``.

    ``dicom=False``: 12 labelled + 2 test NIfTI cases in MSD layout; ``dicom=True``: 3 labelled
    + 1 test case as DICOM series in the case-folder layout.
    """
    force = configured(force, "force")
    from ..demo_data import generate_demo_dataset, generate_dicom_demo_dataset

    if dicom:
        return generate_dicom_demo_dataset(out, overwrite=force, seed=seed + 1)
    return generate_demo_dataset(out, overwrite=force, seed=seed)


#: The demo's plan: a U-Net of half the default width (16 features at full resolution, at most
#: 128), which trains ~3× faster on a CPU and is ample for the demo's three structures.
DEMO_PLAN = {"base_features": 16, "max_features_3d": 128}


@paths_checked
def demo(*, force: bool | None = None, log: Any = None, **settings: Any) -> dict[str, Any]:
    """Run the main job on the embedded datasets: generate → check → plan → preprocess → train →
    infer (the held-out NIfTI and DICOM cases) → evaluate.

    The datasets are written to ``<work_dir>/raw/SegpipeDemo`` (NIfTI, MSD layout) and
    ``<work_dir>/raw/SegpipeDemoDICOM`` (DICOM series, case-folder layout) once (``force``
    regenerates them); the artefacts go to ``<work_dir>/<dataset>/``, the predictions of the
    held-out cases (with a DICOM-SEG for the DICOM one) to ``<work_dir>/<dataset>/demo/predictions``
    and their evaluation to ``…/demo/evaluation``. Settings: ``work_dir``, and ``epochs`` /
    ``iterations_per_epoch`` for another schedule than :data:`DEMO_SCHEDULE`. Returns one entry per step.
    """
    force = configured(force, "force")

    from ..errors import DataError
    from ..io.datasets import load_dataset
    from ..workspace import Workspace

    schedule = dict(DEMO_SCHEDULE)
    for key in ("epochs", "iterations_per_epoch", "train.epochs", "train.iterations_per_epoch"):
        if key in settings:
            schedule[key.rsplit(".", 1)[-1]] = int(settings.pop(key))
    cfg = composed("demo", settings)
    say = log or (lambda msg: None)
    ws = Workspace.at(cfg.work_dir).ensure_writable()
    data = ws.raw_dir / "SegpipeDemo"
    dicom_data = ws.raw_dir / "SegpipeDemoDICOM"
    steps: dict[str, Any] = {}
    for folder, is_dicom in ((data, False), (dicom_data, True)):
        if force or not (folder / "dataset.json").is_file():
            say(f"generating the demo dataset in {folder}")
            generate_demo_data(folder, force=True, dicom=is_dicom)
    steps["data"] = str(data)
    steps["dicom_data"] = str(dicom_data)
    for key, folder in (("check", data), ("check_dicom", dicom_data)):
        say(f"checking {folder.name}")
        report = check(folder)
        steps[key] = {"ok": report.ok, "cases_checked": report.cases_checked, "findings": len(report.findings)}
        if not report.ok:
            raise DataError(f"{folder}: the demo dataset failed its check", hint="rerun with --force to regenerate it")
    say("planning")
    planned = plan(data, work_dir=str(ws.root), force=force, **DEMO_PLAN)
    steps["plan"] = {
        "plans_path": planned["plans_path"],
        "configurations": planned["configurations"],
        "plan_summary_path": planned.get("plan_summary_path"),
    }
    say("preprocessing")
    pre = preprocess(data, work_dir=str(ws.root), force=force, log=say)
    steps["preprocess"] = {
        name: {"cache_dir": r["cache_dir"], "cases": len(r["processed"]) + len(r["reused"])}
        for name, r in pre["configurations"].items()
    }
    say(f"training 3d_fullres on fold 0: {schedule['epochs']} epochs of {schedule['iterations_per_epoch']} iterations")
    trained = train(
        work_dir=str(ws.root),
        dataset=planned["dataset"],
        config="3d_fullres",
        fold=0,
        **schedule,
        overwrite=force,
        log=say,
    )
    steps["train"] = {
        key: trained.get(key)
        for key in ("run_dir", "epochs", "finished", "already_finished", "val_dice", "validation", "validation_dir")
    }
    demo_dir = ws.dataset(planned["dataset"]).root / "demo"
    predictions, references = demo_dir / "predictions", demo_dir / "references"
    say("segmenting the held-out cases: 2 NIfTI volumes and 1 DICOM series (flip TTA)")
    common = {"work_dir": str(ws.root), "dataset": planned["dataset"], "output": predictions, "overwrite": force}
    inferred = [infer(data, log=say, **common), infer(dicom_data, log=say, **common)]
    failed = [f for r in inferred for f in r["failed"]]
    if failed:
        raise DataError(f"demo: segmenting {failed[0]['case']} failed: {failed[0]['error']}", hint="rerun with --force")
    steps["infer"] = {
        "output": str(predictions),
        "cases": [c for r in inferred for c in r["cases"]],
        "dicom_seg": sorted(p.name for p in predictions.glob("*_seg.dcm")),
        "runtime": inferred[0]["model"].get("runtime"),
        "report": inferred[-1].get("report"),
        "flagged": [f for r in inferred for f in r.get("flagged", [])],
    }
    _held_out_references(data, dicom_data, references)
    say("evaluating the held-out cases against their reference labels")
    labels = {int(k): str(v) for k, v in load_dataset(data).labels.items()}
    evaluated = evaluate(predictions, references, output=demo_dir / "evaluation", labels=labels)
    steps["evaluate"] = {
        "output": evaluated["output"],
        "foreground_dice": evaluated["foreground_mean"].get("Dice"),
        "class_dice": {
            evaluated.get("labels", {}).get(c, c): m.get("Dice") for c, m in evaluated["mean"].items() if c != "0"
        },
        "cases": evaluated["n_cases"],
    }
    return steps


def _held_out_references(data: Path, dicom_data: Path, references: Path) -> None:
    """The held-out cases' reference labels side by side in ``references``, named by case id."""
    import shutil

    if references.exists():
        shutil.rmtree(references)
    references.mkdir(parents=True)
    for ref in sorted((data / "labelsTs").glob("*.nii.gz")):
        shutil.copy(ref, references / ref.name)
    for case_dir in sorted(p for p in dicom_data.iterdir() if (p / "reference.nii.gz").is_file()):
        shutil.copy(case_dir / "reference.nii.gz", references / f"{case_dir.name}.nii.gz")
