"""The command line's grammar: commands, usage lines, the argument parser, and how arguments
split into paths and ``key=value`` settings."""

from __future__ import annotations

import argparse
from typing import Any

from .._version import __version__
from ..errors import UsageError

COMMANDS: dict[str, str] = {
    "info": "show what a reader sees in an image file or DICOM folder",
    "check": "read every case of a dataset once and report every problem",
    "plan": "fingerprint a dataset and plan its network configurations",
    "preprocess": "crop, normalise and resample a dataset into the training cache",
    "train": "train one cross-validation fold",
    "infer": "segment new cases (sliding window, TTA, fold ensemble)",
    "evaluate": "compare predictions with reference labels (Dice, HD95, ...)",
    "find-best": "choose the best configuration / ensemble from cross-validation",
    "export": "export a trained model (a dataset's runs, or an nnU-Net v2 model folder) as a self-contained folder",
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
    "export": "segpipe export [DATASET | NNUNET_MODEL] -o OUT [--overwrite] [key=value ...]",
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


def build_parser(help_for: str | None = None) -> argparse.ArgumentParser:
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
            from ..config import settings_help

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
                help="a model folder from `segpipe export`, or an nnU-Net v2 trained model folder "
                "(<Trainer>__<Plans>__<configuration>/; default: the workspace's trained runs)",
            )
            p.add_argument("--overwrite", action="store_true", help="segment finished cases again")
        if name == "export":
            p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
        p.add_argument("args", nargs="*", metavar="ARG", help="paths, then key=value settings")
    return parser


def split_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional paths vs key=value overrides (a token with '=' before any '/' is an override)."""
    paths: list[str] = []
    overrides: list[str] = []
    for a in args:
        head = a.split("=", 1)[0]
        (overrides if "=" in a and "/" not in head else paths).append(a)
    return paths, overrides


#: commands with an ``--overwrite`` flag, which also take it as ``overwrite=true`` (the Python API's spelling)
OVERWRITE_COMMANDS = ("train", "infer", "export")


def flag_overrides(ns: argparse.Namespace, command: str, overrides: list[str]) -> list[str]:
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


def given_settings(cfg: Any, overrides: list[str], command: str | None = None) -> dict[str, Any]:
    """The settings given on the command line: full key → value as composed (lists, dicts plain)."""
    from omegaconf import OmegaConf

    from ..config import expand_overrides
    from ..settings import selectable_groups

    out: dict[str, Any] = {}
    for ov in expand_overrides(overrides, command=command):
        key, raw = ov.split("=", 1)
        if key in selectable_groups():  # a group selection (loss=tversky): the option's name
            out[key] = raw
            continue
        value = OmegaConf.select(cfg, key)
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out
