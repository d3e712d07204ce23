"""Command-line interface: argument parsing and dispatch only.

Every command is a thin wrapper over a function of :mod:`segpipe.api`. Positional arguments
that contain ``=`` are Hydra overrides (``key=value``); ``--json`` prints a machine-readable
result on stdout, while logs and progress go to stderr. Errors print one or two lines and
exit with the code of their :class:`~segpipe.errors.SegpipeError` (README, "Exit codes");
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from . import __version__
from .errors import EXIT_FINDINGS, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, SegpipeError, UsageError

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
PENDING = {
    "train": "the training issue",
    "infer": "the inference issue",
    "evaluate": "the evaluation issue",
    "find-best": "the evaluation issue",
    "export": "the inference issue",
}

log = logging.getLogger("segpipe")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a machine-readable JSON result on stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser = argparse.ArgumentParser(
        prog="segpipe",
        description="Self-configuring segmentation of 3D medical images. Settings are key=value overrides "
        "(see `segpipe config`); every command that keeps state takes work_dir=PATH.",
        epilog="Exit codes: 0 ok, 1 problems found, 2 usage, 3 bad input data, 4 workspace state, 70 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"segpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if name == "demo":
            p.add_argument("--data-only", metavar="OUT", help="only write the synthetic dataset to OUT")
            p.add_argument("--force", action="store_true", help="regenerate data and artefacts")
        p.add_argument("args", nargs="*", metavar="ARG", help="paths, then key=value overrides")
    return parser


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional paths vs key=value overrides (a token with '=' before any '/' is an override)."""
    paths, overrides = [], []
    for a in args:
        head = a.split("=", 1)[0]
        (overrides if "=" in a and "/" not in head else paths).append(a)
    return paths, overrides


def _one_path(command: str, paths: list[str], what: str) -> str:
    if len(paths) != 1:
        raise UsageError(f"`segpipe {command}` takes one {what}, got {len(paths)}: {' '.join(paths) or '(none)'}",
                         hint=f"segpipe {command} {what.upper().replace(' ', '_')} [key=value ...]")
    return paths[0]


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    cols = columns or list(rows[0])
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "×".join(_cell(x) for x in v) if all(isinstance(x, (int, float)) for x in v) else ",".join(map(_cell, v))
    return "" if v is None else str(v)


# ---------------------------------------------------------------------------- commands
def cmd_info(ns: argparse.Namespace, paths: list[str], cfg: Any) -> tuple[int, Any, str]:
    from . import api

    path = _one_path("info", paths, "path")
    dicom = {k: v for k, v in cfg.dicom.items() if v not in (None, False)}
    res = api.info(path, **dicom)
    skip = {"series", "choice_problem", "volume_error", "skipped", "chosen"}
    lines = [f"{k:>16}: {_cell(v)}" for k, v in res.items() if k not in skip]
    series = res.get("series") or []
    if series:
        rows = [{"uid": "…" + str(s.get("uid", ""))[-12:], "modality": s.get("modality"),
                 "description": s.get("description"), "kind": s.get("kind"), "files": s.get("files"),
                 "frames": s.get("frames"), "size": s.get("sizes"), "folder": s.get("folder"),
                 "problem": s.get("problem")} for s in series]
        skipped = ", ".join(f"{n} {k}" for k, n in (res.get("skipped") or {}).items())
        lines += ["", f"{len(series)} series" + (f" (skipped files: {skipped})" if skipped else "") + ":", _table(rows)]
        if res.get("chosen"):
            lines.append(f"chosen series: {res['chosen']}")
    if res.get("volume_error"):
        err = res["volume_error"].splitlines()
        first = err[0] if len(err[0]) < 160 else err[0][:157] + "…"
        lines += [f"no volume read: {first}", *err[1:]]
    return EXIT_OK, res, "\n".join(lines)


def cmd_check(ns: argparse.Namespace, paths: list[str], cfg: Any) -> tuple[int, Any, str]:
    from . import api

    report = api.check(_one_path("check", paths, "dataset"), num_workers=cfg.num_workers)
    rows = [{"case": f.case, "severity": f.severity, "problem": f.problem, "file": f.file,
             "message": f.message, "fix": f.fix} for f in report.findings]
    text = _table(rows) + ("\n" if rows else "")
    errs = len(report.errors)
    text += (f"{report.cases_checked} cases checked: " +
             ("no problems" if not report.findings else f"{errs} error(s) in {len(report.cases_with_errors)} case(s), "
              f"{len(report.findings) - errs} warning(s)"))
    return (EXIT_OK if report.ok else EXIT_FINDINGS), report.to_dict(), text


def cmd_plan(ns: argparse.Namespace, paths: list[str], cfg: Any) -> tuple[int, Any, str]:
    from . import api
    from .config import to_container

    res = api.plan(_one_path("plan", paths, "dataset"), work_dir=cfg.work_dir, force=cfg.force,
                   num_workers=cfg.num_workers, **to_container(cfg.planner))
    text = _table(res["configurations"])
    if res["plan"].get("skipped"):
        text += "\nnot planned: " + "; ".join(f"{k} ({v})" for k, v in res["plan"]["skipped"].items())
    text += f"\nplans written to {res['plans_path']}"
    return EXIT_OK, res, text


def cmd_preprocess(ns: argparse.Namespace, paths: list[str], cfg: Any) -> tuple[int, Any, str]:
    from . import api

    res = api.preprocess(_one_path("preprocess", paths, "dataset"), work_dir=cfg.work_dir,
                         configuration=cfg.configuration, num_workers=cfg.preprocess.num_workers or cfg.num_workers,
                         force=cfg.force, log=log.info)
    rows = [{"configuration": n, "cache": r["cache_dir"], "processed": len(r["processed"]),
             "reused": len(r["reused"]), "seconds": round(r["seconds"], 1)} for n, r in res["configurations"].items()]
    return EXIT_OK, res, _table(rows)


def cmd_config(ns: argparse.Namespace, paths: list[str], cfg: Any) -> tuple[int, Any, str]:
    from omegaconf import OmegaConf

    from .config import to_container

    if paths:
        raise UsageError(f"`segpipe config` takes only key=value overrides, got {' '.join(paths)}")
    return EXIT_OK, to_container(cfg), OmegaConf.to_yaml(cfg).rstrip()


def cmd_demo(ns: argparse.Namespace, paths: list[str], cfg: Any) -> tuple[int, Any, str]:
    from . import api

    if paths:
        raise UsageError(f"`segpipe demo` takes no paths, got {' '.join(paths)}", hint="use --data-only OUT or work_dir=PATH")
    if ns.data_only:
        out = api.generate_demo_data(ns.data_only, force=ns.force)
        return EXIT_OK, {"data": str(out)}, f"demo dataset written to {out}"
    res = api.demo(work_dir=cfg.work_dir, force=ns.force, log=log.info)
    lines = [f"datasets: {res['data']}, {res['dicom_data']}",
             f"check: {res['check']['cases_checked']} NIfTI cases and {res['check_dicom']['cases_checked']} DICOM cases, ok"]
    if "plan" in res:
        lines += [_table(res["plan"]["configurations"]), f"plans: {res['plan']['plans_path']}"]
    if "preprocess" in res:
        lines += [f"preprocessed {n}: {r['cases']} cases in {r['cache_dir']}" for n, r in res["preprocess"].items()]
    if res.get("not_yet_available"):
        lines.append("not yet available (their issues have not landed): " + ", ".join(res["not_yet_available"]))
    return EXIT_OK, res, "\n".join(lines)


HANDLERS: dict[str, Callable[[argparse.Namespace, list[str], Any], tuple[int, Any, str]]] = {
    "info": cmd_info, "check": cmd_check, "plan": cmd_plan, "preprocess": cmd_preprocess, "config": cmd_config, "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
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
    logging.basicConfig(level=logging.DEBUG if ns.debug else logging.WARNING if ns.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    if not ns.debug:
        warnings.filterwarnings("ignore")
    try:
        if ns.command in PENDING:
            from .api import not_available

            not_available(ns.command, PENDING[ns.command])
        from .config import compose_config

        paths, overrides = _split(ns.args)
        cfg = compose_config(overrides)
        code, result, text = HANDLERS[ns.command](ns, paths, cfg)
    except SegpipeError as exc:
        if ns.debug:
            traceback.print_exc()
        print(f"segpipe {ns.command}: error: {exc}", file=sys.stderr)
        if ns.json:
            print(json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": exc.message,
                                                     "fix": exc.hint, "exit_code": exc.exit_code}}))
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"segpipe {ns.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: keep it to one line unless --debug
        if ns.debug:
            traceback.print_exc()
        print(f"segpipe {ns.command}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    if ns.json:
        print(json.dumps(result, indent=2, default=str))
    elif text:
        print(text)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
