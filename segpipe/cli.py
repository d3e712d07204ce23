"""Command-line interface: argument parsing and dispatch only.

Every command is a thin wrapper over a function of :mod:`segpipe.api`. Positional arguments
that contain ``=`` are Hydra overrides (``key=value``); ``--json`` prints a machine-readable
result on stdout, while logs and progress go to stderr. Errors print one or two lines and
exit with the code of their :class:`~segpipe.errors.SegpipeError` (README, "Exit codes");
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from ._version import __version__
from .errors import (
    EXIT_DATA,
    EXIT_FINDINGS,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_STATE,
    EXIT_USAGE,
    SegpipeError,
    StateError,
    UsageError,
)

COMMANDS: dict[str, str] = {
    "info": "show what a reader sees in an image file or DICOM folder",
    "check": "read every case of a dataset once and report every problem",
    "plan": "fingerprint a dataset and plan its network configurations",
    "preprocess": "crop, normalise and resample a dataset into the training cache",
    "train": "train one cross-validation fold",
    "infer": "segment new cases (sliding window, TTA, fold ensemble)",
    "evaluate": "compare predictions with reference labels (Dice, HD95, ...)",
    "find-best": "choose the best configuration / ensemble from cross-validation",
    "export": "export a trained model as a self-contained folder",
    "config": "print the composed configuration (all settings and overrides)",
    "demo": "run the main job on the embedded synthetic dataset",
}
USAGE = {
    "info": "segpipe info PATH [key=value ...]",
    "check": "segpipe check DATASET [num_workers=N]",
    "plan": "segpipe plan DATASET [key=value ...]",
    "preprocess": "segpipe preprocess [DATASET] [key=value ...]",
    "train": "segpipe train fold=0 [config=3d_fullres] [key=value ...]",
    "infer": "segpipe infer INPUT [-o OUT] [-m MODEL] [--overwrite] [key=value ...]",
    "evaluate": "segpipe evaluate PRED GT [-o OUT] [key=value ...]",
    "find-best": "segpipe find-best [DATASET] [key=value ...]",
    "export": "segpipe export [DATASET] -o OUT [--overwrite] [key=value ...]",
    "config": "segpipe config [key=value ...]",
    "demo": "segpipe demo [work_dir=PATH] [--force]",
}
EXAMPLES = {
    "info": "segpipe info study/ series='t1*' modality=MR",
    "check": "segpipe check data/Task04_Hippocampus --json",
    "plan": "segpipe plan data/Task04_Hippocampus gpu_memory_gb=24 configurations=[3d_fullres,2d] work_dir=work",
    "preprocess": "segpipe preprocess config=3d_fullres num_workers=2 work_dir=work",
    "train": "segpipe train fold=0 config=3d_fullres epochs=100 max_time=2h",
    "infer": "segpipe infer patient_dicom/ -o out/ folds=[0,1,2,3,4] tta=true",
    "evaluate": "segpipe evaluate predictions/ labelsTs/ --json",
    "find-best": "segpipe find-best dataset=Hippocampus",
    "export": "segpipe export -o model/",
    "config": "segpipe config gpu_memory_gb=24",
    "demo": "segpipe demo work_dir=/tmp/segpipe_demo",
}
EXIT_CODES_HELP = (
    "exit codes: 0 ok, 1 problems found (check), 2 usage (bad arguments or setting), 3 bad input data "
    "(infer: a case could not be segmented), 4 workspace state (missing plan, unwritable work_dir, disk full), "
    "70 internal error (a bug: rerun with --debug and report it), 75 training stopped by SIGUSR1 and saved "
    "(the same command resumes it), 130 interrupted (Ctrl-C), 143 stopped by SIGTERM (train saves the run first; "
    "the same command resumes it)"
)

log = logging.getLogger("segpipe")


def _parser(help_for: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``help_for`` adds that command's settings (read from conf/) to its help."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a machine-readable JSON result on stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser = argparse.ArgumentParser(
        prog="segpipe",
        description="Self-configuring segmentation of 3D medical images. Settings are key=value overrides "
        "(`segpipe COMMAND --help` lists a command's settings, `segpipe config` all of them); every command that "
        "keeps state takes work_dir=PATH.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"segpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        text = help_text
        epilog = None
        if name == help_for:
            from .config import settings_help

            epilog = (
                f"settings (key=value, shown with their defaults):\n{settings_help(name)}\n\n"
                f"example:\n  {EXAMPLES[name]}\n\n{EXIT_CODES_HELP}"
            )
        p = sub.add_parser(
            name,
            help=text,
            description=text,
            parents=[common],
            usage=USAGE[name],
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "demo":
            p.add_argument("--data-only", metavar="OUT", help="only write the synthetic dataset to OUT")
            p.add_argument("--force", action="store_true", help="regenerate data and artefacts")
        if name == "train":
            p.add_argument(
                "--overwrite", action="store_true", help="train a finished or interrupted run again from scratch"
            )
        if name in ("infer", "export", "evaluate"):
            p.add_argument(
                "-o",
                "--output",
                metavar="OUT",
                help="output folder"
                + {
                    "infer": " (default: INPUT_segpipe beside the input)",
                    "export": " for the model (required)",
                    "evaluate": " for the tables and plots (default: the predictions' folder)",
                }[name],
            )
        if name == "infer":
            p.add_argument(
                "-m",
                "--model",
                metavar="MODEL",
                help="a model folder from `segpipe export` (default: the workspace's trained runs)",
            )
            p.add_argument("--overwrite", action="store_true", help="segment finished cases again")
        if name == "export":
            p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
        p.add_argument("args", nargs="*", metavar="ARG", help="paths, then key=value settings")
    return parser


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional paths vs key=value overrides (a token with '=' before any '/' is an override)."""
    paths: list[str] = []
    overrides: list[str] = []
    for a in args:
        head = a.split("=", 1)[0]
        (overrides if "=" in a and "/" not in head else paths).append(a)
    return paths, overrides


#: commands with an ``--overwrite`` flag, which also take it as ``overwrite=true`` (the Python API's spelling)
OVERWRITE_COMMANDS = ("train", "infer", "export")


def _flag_overrides(ns: argparse.Namespace, command: str, overrides: list[str]) -> list[str]:
    """``overwrite=true|false`` as the ``--overwrite`` flag, for the commands that have it."""
    rest = []
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key == "overwrite" and command in OVERWRITE_COMMANDS:
            word = value.strip().lower()
            if word not in ("true", "false", "1", "0", "yes", "no"):
                raise UsageError(f"overwrite={value}: expected true or false", hint="--overwrite (or overwrite=true)")
            ns.overwrite = ns.overwrite or word in ("true", "1", "yes")
            continue
        rest.append(ov)
    return rest


def _one_path(command: str, paths: list[str], what: str) -> str:
    if len(paths) != 1:
        raise UsageError(
            f"`segpipe {command}` takes one {what}, got {len(paths)}: {' '.join(paths) or '(none)'}",
            hint=f"segpipe {command} {what.upper().replace(' ', '_')} [key=value ...]",
        )
    return paths[0]


def _given(cfg: Any, overrides: list[str], command: str | None = None) -> dict[str, Any]:
    """The settings given on the command line: full key → value as composed (lists, dicts plain)."""
    from omegaconf import OmegaConf

    from .config import expand_overrides
    from .settings import selectable_groups

    out: dict[str, Any] = {}
    for ov in expand_overrides(overrides, command=command):
        key, raw = ov.split("=", 1)
        if key in selectable_groups():  # a group selection (loss=tversky): the option's name
            out[key] = raw
            continue
        value = OmegaConf.select(cfg, key)
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def _term_width() -> int | None:
    return shutil.get_terminal_size((0, 0)).columns or None if sys.stdout.isatty() else None


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None, *, width: int | None = None) -> str:
    """A plain-text table; on a terminal the widest columns are shortened (with …) to fit ``width``."""
    if not rows:
        return ""
    cols = columns or list(rows[0])
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    width = width if width is not None else _term_width()
    if width:
        while sum(widths) + 2 * (len(widths) - 1) > width:
            i = max(range(len(widths)), key=lambda k: widths[k])
            floor = max(len(cols[i]), 8)
            if widths[i] <= floor:
                break
            widths[i] -= 1
        cells = [[v if len(v) <= w else v[: max(w - 1, 0)] + "…" for v, w in zip(row, widths)] for row in cells]
    line = "  ".join(c[:w].ljust(w) for c, w in zip(cols, widths))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(out)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "×".join(_cell(x) for x in v) if all(isinstance(x, (int, float)) for x in v) else ",".join(map(_cell, v))
    return "" if v is None else str(v)


# ---------------------------------------------------------------------------- commands
Handler = Callable[[argparse.Namespace, list[str], dict[str, Any]], tuple[int, Any, str]]


def _series_rows(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from .io.dicom import unique_suffixes

    uids = [str(s.get("uid", "")) for s in series]
    shown = unique_suffixes(uids)
    return [
        {
            "uid": ("…" if u != full else "") + u,
            "modality": s.get("modality"),
            "description": s.get("description"),
            "kind": s.get("kind"),
            "files": s.get("files"),
            "frames": s.get("frames"),
            "size": s.get("sizes"),
            "folder": s.get("folder"),
            "problem": s.get("problem"),
        }
        for s, u, full in zip(series, shown, uids)
    ]


def cmd_info(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from . import api

    path = _one_path("info", paths, "path")
    res = api.info(path, **given)
    skip = {"series", "choice_problem", "volume_error", "skipped", "chosen", "skipped_reasons", "warnings"}
    lines = [f"{k:>16}: {_cell(v)}" for k, v in res.items() if k not in skip]
    series = res.get("series") or []
    skipped = ", ".join(f"{n} {k}" for k, n in (res.get("skipped") or {}).items())
    if series:
        lines += [
            "",
            f"{len(series)} series" + (f" (skipped files: {skipped})" if skipped else "") + ":",
            _table(_series_rows(series)),
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
    from . import api

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
    text = _table(rows) + ("\n" if rows else "")
    errs = len(report.errors)
    text += f"{report.cases_checked} cases checked: " + (
        "no problems"
        if not report.findings
        else f"{errs} error(s) in {len(report.cases_with_errors)} case(s), {len(report.findings) - errs} warning(s)"
    )
    return (EXIT_OK if report.ok else EXIT_FINDINGS), report.to_dict(), text


def cmd_plan(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from . import api

    res = api.plan(_one_path("plan", paths, "dataset"), log=log.info, **given)
    text = _table(res["configurations"])
    if res["plan"].get("skipped"):
        text += "\nnot planned: " + "; ".join(f"{k} ({v})" for k, v in res["plan"]["skipped"].items())
    text += f"\nplans written to {res['plans_path']}"
    for key, what in (("plan_summary_path", "summary"), ("dataset_report_path", "dataset report")):
        if res.get(key):
            text += f"\n{what}: {res[key]}"
    return EXIT_OK, res, text


def cmd_preprocess(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from . import api

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
    return EXIT_OK, res, _table(rows)


def cmd_config(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from omegaconf import OmegaConf

    from .config import settings_config, to_container

    if paths:
        raise UsageError(f"`segpipe config` takes only key=value settings, got {' '.join(paths)}")
    cfg = settings_config("config", given)
    return EXIT_OK, to_container(cfg), _commented_yaml(OmegaConf.to_yaml(cfg).rstrip())


def _commented_yaml(text: str) -> str:
    """The composed YAML with each setting's comment from conf/ beside it, so that two settings of
    one name in different groups (``train.batch_size``, ``infer.batch_size``) say what each is."""
    import re

    from .settings import setting_comments

    comments = setting_comments()
    path: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    out = []
    for line in text.splitlines():
        m = re.match(r"^( *)([A-Za-z_][\w-]*):(.*)$", line)
        if not m:
            out.append(line)
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        path = [(i, k) for i, k in path if i < indent]
        full = ".".join([k for _, k in path] + [key])
        path.append((indent, key))
        comment = comments.get(full)
        out.append(f"{line}  # {comment}" if comment and rest.strip() else line)
    return "\n".join(out)


def cmd_demo(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from . import api

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
        lines += [_table(res["plan"]["configurations"]), f"plans: {res['plan']['plans_path']}"]
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
        lines.append(f"segmented the held-out cases {', '.join(i['cases'])} into {i['output']}{seg}")
    if res.get("evaluate"):
        e = res["evaluate"]
        dice = e["foreground_dice"]
        per_class = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in e["class_dice"].items())
        lines.append(
            f"held-out Dice: {'n/a' if dice is None else f'{dice:.4f}'} foreground mean ({per_class}) over "
            f"{e['cases']} cases"
        )
        lines.append(f"open: {e['output']}/dice_boxplot.png, {e['output']}/summary.json")
    return EXIT_OK, res, "\n".join(lines)


#: the result of a process that prints nothing (the other ranks of a distributed run)
_QUIET: Any = object()


def _launched() -> float:
    """The ``time.perf_counter()`` value of this process's launch: ``max_time`` counts launch to exit."""
    try:
        import psutil

        age = max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # no process table to read: count from now
        age = 0.0
    return time.perf_counter() - age


def cmd_train(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from . import api

    if paths:
        raise UsageError(
            f"`segpipe train` takes no paths, got {' '.join(paths)}",
            hint="name the planned dataset with dataset=NAME; " + USAGE["train"],
        )
    res = api.train(log=log.info, overwrite=ns.overwrite, started=_launched(), **given)
    if res.get("rank"):  # not rank 0 of a distributed run
        return (EXIT_PREEMPTED if res.get("preempted") else EXIT_OK), _QUIET, ""
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
    from . import api

    source = _one_path("infer", paths, "input")
    res = api.infer(source, output=ns.output, model=ns.model, overwrite=ns.overwrite, log=log.info, **given)
    code = EXIT_DATA if res["failed"] else EXIT_OK
    if any(f.get("out_of_memory") for f in res["failed"]):
        code = EXIT_STATE  # out of memory: the machine, not the data
    if res.get("rank"):  # another process of a distributed batch: process 0 speaks for the whole batch
        return code, _QUIET, ""
    lines = [
        f"{len(res['written'])} case(s) segmented, {len(res['skipped'])} already done, {len(res['failed'])} failed "
        f"({res['seconds']:.1f} s)",
    ]
    for f in res["failed"]:
        lines.append(f"  failed: {f['case']}: {f['error']}" + (f" (fix: {f['hint']})" if f.get("hint") else ""))
    lines.append(f"results: {res['output']} (<case>.{res['format']} label maps, <case>.json reports)")
    return code, res, "\n".join(lines)


def cmd_export(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from . import api

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
    from . import api

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
        _table(rows),
        f"foreground mean over {res['n_cases']} cases: Dice {fmt(fg.get('Dice'))}, HD95 {fmt(fg.get('HD95'))} mm, "
        f"NSD {fmt(fg.get('NSD'))}"
        + (
            f" ({len(res['missing_predictions'])} reference case(s) without a prediction left out)"
            if res.get("missing_predictions")
            else ""
        ),
        f"written to {res['output']}: evaluation.csv, summary.json, dice_boxplot.png",
    ]
    return EXIT_OK, res, "\n".join(lines)


def cmd_find_best(ns: argparse.Namespace, paths: list[str], given: dict[str, Any]) -> tuple[int, Any, str]:
    from . import api

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
        _table(rows),
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


def _os_error(exc: OSError) -> SegpipeError | None:
    """Workspace problems the system reports (disk full, read-only, no permission) as exit-4 errors."""
    where = exc.filename or ""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return StateError(
            f"no space left on the device writing {where}".rstrip(),
            hint="free some disk space or write elsewhere (work_dir=PATH, or -o OUT for infer and evaluate); "
            "finished work is kept",
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StateError(
            f"cannot write {where}: {exc.strerror}".rstrip(),
            hint="write to a writable place (work_dir=PATH, or -o OUT for infer and evaluate), or fix the folder's permissions",
        )
    return None


#: what frees memory, per command
MEMORY_FIXES = {
    "infer": "segment with fewer windows per pass (batch_size=1), without probabilities=true, "
    "or on a machine with more memory",
    "train": "a smaller batch_size=, fewer num_workers=, or a machine with more memory",
    "plan": "fewer num_workers= (each worker holds one case), or a machine with more memory",
    "preprocess": "fewer num_workers= (each worker holds one case), or a machine with more memory",
    "check": "fewer num_workers= (each worker holds one case), or a machine with more memory",
}


def out_of_memory(command: str, exc: BaseException) -> StateError:
    """An allocation that failed, as an exit-4 error: what was asked for, what is free, and the fix."""
    import resource

    from .io.limits import available_memory

    detail = str(exc).strip().split(" for an array")[0] or "an allocation failed"
    free = f"{available_memory() / 2**30:.1f} GiB free on the machine"
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        free += f", the process limited to {limit / 2**30:.1f} GiB of address space"
    return StateError(
        f"out of memory ({detail}; {free})",
        hint=MEMORY_FIXES.get(command, "free memory or use a machine with more memory"),
    )


def _print_error(command: str, ns: argparse.Namespace, etype: str, message: str, *, fix: str | None, code: int) -> int:
    print(f"segpipe {command}: error: {message}" + (f"\n  fix: {fix}" if fix else ""), file=sys.stderr)
    if getattr(ns, "json", False):
        print(json.dumps({"ok": False, "error": {"type": etype, "message": message, "fix": fix, "exit_code": code}}))
    return code


class _Formatter(logging.Formatter):
    """Progress and information as they are; a warning or error as ``segpipe COMMAND: warning: …``."""

    def __init__(self, command: str) -> None:
        super().__init__("%(message)s")
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"segpipe {self.command}: {record.levelname.lower()}: {text}"
        return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    help_for = next((a for a in argv if a in COMMANDS), None) if wants_help else None
    parser = _parser(help_for)
    # Options may sit between paths and overrides (`check DATA --json work_dir=W`): argparse stops
    # a '*' positional at the first option, so leftovers that are not options are arguments too.
    ns, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        ns.args = [*getattr(ns, "args", []), *extra]
    if not ns.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(ns.command))
    logging.basicConfig(
        level=logging.DEBUG if ns.debug else logging.WARNING if ns.quiet else logging.INFO, handlers=[handler]
    )
    for h in logging.getLogger().handlers:  # a second command in one process (the API, tests): its name
        if isinstance(h.formatter, _Formatter):
            h.formatter.command = ns.command
    if not ns.debug:
        warnings.filterwarnings("ignore")
    command = ns.command
    try:
        from .config import compose_config

        paths, overrides = _split(ns.args)
        overrides = _flag_overrides(ns, command, overrides)
        cfg = compose_config(overrides, command=command)
        code, result, text = HANDLERS[command](ns, paths, _given(cfg, overrides, command))
    except SegpipeError as exc:
        if ns.debug:
            traceback.print_exc()
        return _print_error(command, ns, type(exc).__name__, exc.message, fix=exc.hint, code=exc.exit_code)
    except KeyboardInterrupt:
        return _print_error(command, ns, "KeyboardInterrupt", "interrupted", fix=None, code=EXIT_INTERRUPTED)
    except MemoryError as exc:
        if ns.debug:
            traceback.print_exc()
        oom = out_of_memory(command, exc)
        return _print_error(command, ns, "MemoryError", oom.message, fix=oom.hint, code=oom.exit_code)
    except OSError as exc:
        mapped = _os_error(exc)
        if mapped is None:
            return _internal(command, ns, exc)
        if ns.debug:
            traceback.print_exc()
        return _print_error(command, ns, type(mapped).__name__, mapped.message, fix=mapped.hint, code=mapped.exit_code)
    except Exception as exc:  # a bug: keep it to one line unless --debug
        return _internal(command, ns, exc)
    if result is _QUIET:  # another process of a distributed run: rank 0 speaks for it
        return code
    try:
        if ns.json:
            print(json.dumps(result, indent=2, default=str))
        elif text:
            print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `segpipe ... | head`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def _internal(command: str, ns: argparse.Namespace, exc: BaseException) -> int:
    if ns.debug:
        traceback.print_exc()
    return _print_error(
        command,
        ns,
        type(exc).__name__,
        f"internal error: {type(exc).__name__}: {exc}",
        fix="rerun with --debug and report the traceback",
        code=EXIT_INTERNAL,
    )


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
