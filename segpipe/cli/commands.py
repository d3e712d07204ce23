"""One handler per command: check the paths, call :mod:`segpipe.api`, and turn its result into
the exit code, the JSON result and the lines printed."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import EXIT_DATA, EXIT_FINDINGS, EXIT_OK, EXIT_PREEMPTED, EXIT_STATE, UsageError
from .parser import USAGE
from .text import cell, commented_yaml, series_rows, table

log = logging.getLogger("segpipe")

Handler = Callable[[argparse.Namespace, list[str], dict[str, Any]], tuple[int, Any, str]]


def _one_path(command: str, paths: list[str], what: str) -> str:
    if len(paths) != 1:
        raise UsageError(
            f"`segpipe {command}` takes one {what}, got {len(paths)}: {' '.join(paths) or '(none)'}",
            hint=f"segpipe {command} {what.upper().replace(' ', '_')} [key=value ...]",
        )
    return paths[0]


def cmd_info(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from .. import api

    path = _one_path("info", paths, "path")
    res = api.info(path, **given)
    skip = {"series", "choice_problem", "volume_error", "skipped", "chosen", "skipped_reasons", "warnings"}
    lines = [f"{k:>16}: {cell(v)}" for k, v in res.items() if k not in skip]
    series = res.get("series") or []
    skipped = ", ".join(f"{n} {k}" for k, n in (res.get("skipped") or {}).items())
    if series:
        lines += [
            "",
            f"{len(series)} series" + (f" (skipped files: {skipped})" if skipped else "") + ":",
            table(series_rows(series)),
        ]
        if res.get("chosen"):
            lines.append(f"chosen series: {res['chosen']}")
    elif skipped:
        lines.append(f"skipped files: {skipped}")
    lines += [str(reason) for reason in res.get("skipped_reasons") or []]
    for warning in res.get("warnings") or []:
        lines.append(f"warning: {warning}")
    code = EXIT_OK
    if res.get("volume_error"):
        err = res["volume_error"].splitlines()
        lines += [f"no volume read: {err[0]}", *err[1:]]
        code = EXIT_DATA
    return code, res, "\n".join(lines)


def cmd_check(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from .. import api

    report = api.check(_one_path("check", paths, "dataset"), **given)
    rows = [
        {
            "case": f.case,
            "severity": f.severity,
            "problem": f.problem,
            "file": f.file,
            "message": f.message,
            "fix": f.fix,
        }
        for f in report.findings
    ]
    text = table(rows) + ("\n" if rows else "")
    errs = len(report.errors)
    text += f"{report.cases_checked} cases checked: " + (
        "no problems"
        if not report.findings
        else f"{errs} error(s) in {len(report.cases_with_errors)} case(s), {len(report.findings) - errs} warning(s)"
    )
    return (EXIT_OK if report.ok else EXIT_FINDINGS), report.to_dict(), text


def cmd_plan(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from .. import api

    res = api.plan(_one_path("plan", paths, "dataset"), log=log.info, **given)
    text = table(res["configurations"])
    if res["plan"].get("skipped"):
        text += "\nnot planned: " + "; ".join(f"{k} ({v})" for k, v in res["plan"]["skipped"].items())
    text += f"\nplans written to {res['plans_path']}"
    for key, what in (("plan_summary_path", "summary"), ("dataset_report_path", "dataset report")):
        if res.get(key):
            text += f"\n{what}: {res[key]}"
    return EXIT_OK, res, text


def cmd_preprocess(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from .. import api

    if len(paths) > 1:
        raise UsageError(
            f"`segpipe preprocess` takes at most one dataset, got {len(paths)}: {' '.join(paths)}",
            hint=USAGE["preprocess"],
        )
    dataset = given.pop("dataset", None)
    if paths and dataset is not None:
        raise UsageError("give the dataset once: as a path or as dataset=NAME, not both", hint=USAGE["preprocess"])
    res = api.preprocess(paths[0] if paths else dataset, log=log.info, **given)
    rows = [
        {
            "configuration": n,
            "cache": r["cache_dir"],
            "processed": len(r["processed"]),
            "reused": len(r["reused"]),
            "rebuilt": len(r.get("rebuilt") or {}),
            "removed": len(r.get("removed") or []),
            "seconds": round(r["seconds"], 1),
        }
        for n, r in res["configurations"].items()
    ]
    return EXIT_OK, res, table(rows)


def cmd_config(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from omegaconf import OmegaConf

    from ..config import settings_config, to_container

    if paths:
        raise UsageError(f"`segpipe config` takes only key=value settings, got {' '.join(paths)}")
    cfg = settings_config("config", given)
    return EXIT_OK, to_container(cfg), commented_yaml(OmegaConf.to_yaml(cfg).rstrip())


def cmd_demo(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from .. import api

    if paths:
        raise UsageError(
            f"`segpipe demo` takes no paths, got {' '.join(paths)}", hint="use --data-only OUT or work_dir=PATH"
        )
    if ns.data_only:
        if given:
            raise UsageError("`segpipe demo --data-only OUT` takes no settings", hint="segpipe demo --data-only OUT")
        out = api.generate_demo_data(ns.data_only, force=ns.force)
        return EXIT_OK, {"data": str(out)}, f"demo dataset written to {out}"
    res = api.demo(force=ns.force, log=log.info, **given)
    lines = [
        f"datasets: {res['data']}, {res['dicom_data']}",
        f"check: {res['check']['cases_checked']} NIfTI cases and {res['check_dicom']['cases_checked']} DICOM cases, ok",
    ]
    if "plan" in res:
        lines += [table(res["plan"]["configurations"]), f"plans: {res['plan']['plans_path']}"]
        if res["plan"].get("plan_summary_path"):
            lines.append(f"plan summary: {res['plan']['plan_summary_path']}")
    if "preprocess" in res:
        lines += [f"preprocessed {n}: {r['cases']} cases in {r['cache_dir']}" for n, r in res["preprocess"].items()]
    if res.get("train"):
        t = res["train"]
        lines.append(f"trained 3d_fullres fold 0 for {t['epochs']} epochs in {t['run_dir']}")
        lines.append("full-case validation (fold 0): " + (t.get("validation") or "none"))
    if res.get("infer"):
        i = res["infer"]
        seg = f" and {', '.join(i['dicom_seg'])} (DICOM-SEG)" if i["dicom_seg"] else ""
        runtime = f" (networks run by {i['runtime']})" if i.get("runtime") else ""
        lines.append(f"segmented the held-out cases {', '.join(i['cases'])} into {i['output']}{seg}{runtime}")
    if res.get("evaluate"):
        e = res["evaluate"]
        dice = e["foreground_dice"]
        per_class = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in e["class_dice"].items())
        lines.append(
            f"held-out Dice: {'n/a' if dice is None else f'{dice:.4f}'} foreground mean ({per_class}) over "
            f"{e['cases']} cases"
        )
        lines.append(f"evaluation: {e['output']}/dice_boxplot.png, {e['output']}/summary.json")
    if (res.get("infer") or {}).get("report"):
        lines.append(f"open the report of the segmented cases: {res['infer']['report']}")
    return EXIT_OK, res, "\n".join(lines)


#: the result of a process that prints nothing (the other ranks of a distributed run)
QUIET: Any = object()


def _launched() -> float:
    """The ``time.perf_counter()`` value of this process's launch: ``max_time`` counts launch to exit."""
    try:
        import psutil

        age = max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # no process table to read: count from now
        age = 0.0
    return time.perf_counter() - age


def cmd_train(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from .. import api

    if paths:
        raise UsageError(
            f"`segpipe train` takes no paths, got {' '.join(paths)}",
            hint="name the planned dataset with dataset=NAME; " + USAGE["train"],
        )
    res = api.train(log=log.info, overwrite=ns.overwrite, started=_launched(), **given)
    if res.get("rank"):  # not rank 0 of a distributed run
        return (EXIT_PREEMPTED if res.get("preempted") else EXIT_OK), QUIET, ""
    if res.get("preempted"):
        return EXIT_PREEMPTED, res, f"{res['preempted']}\nrun folder: {res['run_dir']}"
    dice = ", ".join(f"{v:.4f}" for v in res["pseudo_dice"]) or "n/a"
    state = "already finished" if res["already_finished"] else ("finished" if res["finished"] else "stopped")
    lines = [
        f"{res['dataset']} {res['configuration']} fold {res['fold']}: {state} after {res['epochs']} of "
        f"{res['planned_epochs']} epochs",
        f"pseudo-Dice per class (validation patches): {dice}; EMA foreground mean {res['ema_fg_dice']:.4f}",
        "full-case validation: " + (res.get("validation") or "none (fold=all trains on every case)"),
        f"run folder: {res['run_dir']} (last.pt / best.pt / final.pt, metrics.csv, progress.png, settings.json, "
        "validation/)",
    ]
    return EXIT_OK, res, "\n".join(lines)


def cmd_infer(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from .. import api

    source = _one_path("infer", paths, "input")
    res = api.infer(source, output=ns.output, model=ns.model, overwrite=ns.overwrite, log=log.info, **given)
    code = EXIT_DATA if res["failed"] else EXIT_OK
    if any(f.get("out_of_memory") for f in res["failed"]):
        code = EXIT_STATE  # out of memory: the machine, not the data
    if res.get("rank"):  # another process of a distributed batch: process 0 speaks for the whole batch
        return code, QUIET, ""
    per_case = f"; {res['seconds'] / len(res['written']):.1f} s per case" if res["written"] else ""
    runtime = (res.get("model") or {}).get("runtime")
    lines = [
        f"{len(res['written'])} case(s) segmented, {len(res['skipped'])} already done, {len(res['failed'])} failed "
        f"({res['seconds']:.1f} s{per_case}" + (f", networks run by {runtime})" if runtime else ")"),
    ]
    for f in res["failed"]:
        lines.append(f"  failed: {f['case']}: {f['error']}" + (f" (fix: {f['hint']})" if f.get("hint") else ""))
    for f in res.get("flagged", []):
        lines.append(f"  flagged: {f['case']}: " + "; ".join(flag["message"] for flag in f["flags"]))
    lines.append(f"results: {res['output']} (<case>.{res['format']} label maps, <case>.json reports)")
    if res.get("report"):
        lines.append(f"report: {res['report']}")
    return code, res, "\n".join(lines)


def cmd_export(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from .. import api

    if len(paths) > 1:
        raise UsageError(f"`segpipe export` takes at most one dataset, got {' '.join(paths)}", hint=USAGE["export"])
    if not ns.output:
        raise UsageError("`segpipe export` needs the model folder to write", hint=USAGE["export"])
    res = api.export(paths[0] if paths else None, output=ns.output, overwrite=ns.overwrite, **given)
    members = ", ".join(
        f"{m['configuration']} fold {m['fold']}"
        + ("" if m["validation_dice"] is None else f" (validation Dice {m['validation_dice']:.4f})")
        for m in res["members"]
    )
    text = f"model of {res['dataset']} written to {res['model']}: {members}\nuse it with: segpipe infer INPUT -m {res['model']}"
    return EXIT_OK, res, text


def cmd_evaluate(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from .. import api

    if len(paths) != 2:
        raise UsageError(
            f"`segpipe evaluate` takes the predictions' folder and the references' folder, got {len(paths)} path(s)",
            hint=USAGE["evaluate"],
        )
    res = api.evaluate(paths[0], paths[1], output=ns.output, **given)
    names = res.get("labels", {})
    rows = [
        {
            "class": f"{c} {names.get(c, '')}".strip(),
            "Dice": m.get("Dice"),
            "HD95 (mm)": m.get("HD95"),
            "NSD": m.get("NSD"),
        }
        for c, m in res["mean"].items()
        if c != "0"
    ]
    fg = res["foreground_mean"]

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        table(rows),
        f"foreground mean over {res['n_cases']} cases: Dice {fmt(fg.get('Dice'))}, HD95 {fmt(fg.get('HD95'))} mm, "
        f"NSD {fmt(fg.get('NSD'))}"
        + (
            f" ({len(res['missing_predictions'])} reference case(s) without a prediction left out)"
            if res.get("missing_predictions")
            else ""
        ),
        f"written to {res['output']}: evaluation.csv, summary.json, dice_boxplot.png",
        *([f"report: {res['report']}"] if res.get("report") else []),
    ]
    return EXIT_OK, res, "\n".join(lines)


def cmd_find_best(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from .. import api

    if len(paths) > 1:
        raise UsageError(
            f"`segpipe find-best` takes at most one dataset, got {' '.join(paths)}", hint=USAGE["find-best"]
        )
    res = api.find_best(paths[0] if paths else None, log=log.info, **given)
    rows = [
        {"candidate": " + ".join(c["configurations"]), "mean foreground Dice": c["mean_fg_dice"]}
        for c in res["candidates"]
    ]
    post = res["postprocessing"]["largest_component"]
    lines = [
        table(rows),
        f"best: {' + '.join(res['configurations'])} (mean foreground Dice {res['mean_fg_dice']:.4f} on "
        f"{res['cases']} of {res['cases_total']} cases)",
        "post-processing: "
        + (
            f"largest connected component of class {', '.join(str(c) for c in post)} "
            f"(mean foreground Dice {res['mean_fg_dice_postprocessed']:.4f})"
            if post
            else "none (no class gained from keeping its largest component)"
        ),
        f"decision: {res['path']} (used by segpipe infer and segpipe export)",
        *([f"report: {res['report']}"] if res.get("report") else []),
    ]
    return EXIT_OK, res, "\n".join(lines)


HANDLERS: dict[str, Handler] = {
    "info": cmd_info,
    "check": cmd_check,
    "plan": cmd_plan,
    "preprocess": cmd_preprocess,
    "config": cmd_config,
    "demo": cmd_demo,
    "train": cmd_train,
    "infer": cmd_infer,
    "export": cmd_export,
    "find-best": cmd_find_best,
    "evaluate": cmd_evaluate,
}
