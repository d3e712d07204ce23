"""Trained models: the networks of a workspace's runs, and self-contained model folders.

A **model** is a plan plus one set of weights per (configuration, fold) — its *members* — and the
post-processing decision. It comes either from a workspace (``runs/<config>/fold_<k>/final.pt``
of the trained folds) or from a **model folder** written by :func:`export_model`::

    model/
      model.json          format, dataset, labels, channels, members (file, checksum, validation
                          Dice), post-processing, versions
      plans.json          the plan (spacing, patch, normalisation, networks)
      postprocessing.json the classes that keep only their largest connected component
      weights/<config>/fold_<k>.pt   network weights only (``torch.load(weights_only=True)``)
      openvino/<key>/     with ``runtime=openvino``: each network converted for OpenVINO
                          (network.xml, network.bin; checksummed in model.json)
      README.md           the model card: what it segments, from which data, how well

A model folder needs nothing of the training workspace. Loading one checks the format, that every
file it names lies inside the folder, and each weight file's SHA-256; weights load with
``weights_only=True``, so a crafted pickle is refused instead of run.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import versions
from ..errors import ConfigError, StateError, UsageError
from ..io.atomic import write_text
from ..io.jsonio import read_json, write_json
from ..planning import Plan, load_plan, save_plan
from ..settings import configured
from ..splits import N_FOLDS
from ..workspace import MODEL_FILE, RunFolder
from .cascade import stage_only, with_previous_stages
from .model_card import model_card
from .postprocess import check_postprocessing
from .runtimes import export_openvino

log = logging.getLogger("segpipe")

__all__ = [
    "CHECKPOINTS",
    "MODEL_FILE",
    "MODEL_FORMAT",
    "Member",
    "Model",
    "export_model",
    "export_warnings",
    "load_model_folder",
    "workspace_model",
]

MODEL_FORMAT = "segpipe.model"
MODEL_VERSION = 2  # 2: model.json checksums plans.json and postprocessing.json too

POSTPROCESSING_FILE = "postprocessing.json"
#: the files besides the weights that a model folder's ``model.json`` checksums
CHECKSUMMED_FILES = ("plans.json", POSTPROCESSING_FILE)
#: which weights of a run to use: ``final.pt`` (the end of training, nnU-Net's default) or ``best.pt``
CHECKPOINTS = ("final", "best")


@dataclass(frozen=True)
class Member:
    """One trained network of a model: its configuration, fold and weight file."""

    configuration: str
    fold: str
    path: Path
    validation_dice: float | None = None
    #: SHA-256 of the weight file when already known (a model folder's record); else computed on load
    sha256: str | None = None
    #: how the network was trained (see :func:`training_record`), when known
    training: dict[str, Any] | None = field(default=None, compare=False)
    #: the network weights already read (an nnU-Net checkpoint's), else read from ``path`` when needed
    weights: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass
class Model:
    """A plan, its trained members and the post-processing decision (see the module docstring)."""

    plan: Plan
    members: list[Member]
    postprocessing: dict[str, Any] = field(default_factory=lambda: {"largest_component": []})
    origin: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def plan_sha256(self) -> str:
        """SHA-256 of the plan as canonical JSON: any change of spacing, patch or normalisation changes it."""
        text = json.dumps(self.plan.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def configurations(self) -> list[str]:
        return list(dict.fromkeys(m.configuration for m in self.members))

    def folds(self, configuration: str) -> list[str]:
        return [m.fold for m in self.members if m.configuration == configuration]

    def select(self, configs: Sequence[str] | None = None, folds: Sequence[str] | None = None) -> Model:
        """The same model restricted to ``configs`` and ``folds`` (each must exist)."""
        members = self.members
        if configs is not None:
            missing = [c for c in configs if c not in self.configurations]
            if missing:
                raise StateError(
                    f"{self.origin}: no trained {', '.join(missing)}",
                    hint=f"available: {', '.join(self.configurations)} (config=NAME)",
                )
            stages = {self.plan.previous_stage(c) for c in configs} - {None}  # a cascade's first stage comes along
            members = [m for m in members if m.configuration in configs or m.configuration in stages]
        if folds is not None:
            wanted = [str(f) for f in folds]
            for c in dict.fromkeys(m.configuration for m in members):
                have = [m.fold for m in members if m.configuration == c]
                missing = [f for f in wanted if f not in have]
                if missing:
                    raise StateError(
                        f"{self.origin}: {c} has no trained fold {', '.join(missing)}",
                        hint=f"trained folds of {c}: {', '.join(have)} (folds=[...])",
                    )
            members = [m for m in members if m.fold in wanted or stage_only(self.plan, m.configuration, configs or [])]
        return Model(self.plan, members, self.postprocessing, self.origin, self.info)


def parse_configs(value: Any) -> list[str] | None:
    """``config=`` as a list of configuration names: None (the default choice), ``2d``, ``[3d_fullres,2d]``."""
    if value is None:
        return None
    if isinstance(value, str):
        names = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    else:
        names = [str(v) for v in value]
    return names or None


def parse_folds(value: Any) -> list[str] | None:
    """``folds=`` as a list of fold names: None (every trained fold), ``0``, ``[0,1]``, ``all``."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else str(value).strip("[]").split(",")
    folds = [str(v).strip() for v in items if str(v).strip()]
    for f in folds:
        if f != "all" and not (f.isdigit() and 0 <= int(f) < N_FOLDS):
            raise UsageError(f"folds={value}: {f!r} is not a fold", hint="folds=[0,1,2,3,4], folds=0 or folds=all")
    return folds or None


# ---------------------------------------------------------------------------- from a workspace
def _validation_dice(run_dir: Path) -> float | None:
    summary = RunFolder(run_dir).validation_summary
    try:
        value = json.loads(summary.read_text(encoding="utf-8"))["foreground_mean"]["Dice"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


#: a member whose cross-validation Dice is below this is exported with a warning: it may not be trained enough
LOW_VALIDATION_DICE = 0.5


def training_record(run_dir: Path, plan: Plan, configuration: str, fold: str, dws: Any) -> dict[str, Any]:
    """What a model card says of one trained run: epochs done and planned (and whether the schedule
    ended), the budget, the training and validation cases, the spacing and the training time."""
    record: dict[str, Any] = {"spacing_mm": list(plan.config(configuration).spacing)}
    try:
        settings = json.loads(RunFolder(run_dir).settings.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError, AttributeError):
        settings = {}
    record["epochs_planned"] = settings.get("epochs")
    record["iterations_per_epoch"] = settings.get("iterations_per_epoch")
    record["max_time"] = settings.get("max_time")
    try:
        with open(RunFolder(run_dir).metrics, encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        rows = []
    record["epochs_done"] = len(rows)
    seconds = [float(r["seconds"]) for r in rows if r.get("seconds") not in (None, "")]
    record["training_seconds"] = round(sum(seconds), 3) if seconds else None
    record["finished"] = RunFolder(run_dir).final.is_file()
    try:
        from ..splits import fold_cases

        splits = json.loads(Path(dws.splits_path).read_text(encoding="utf-8"))
        train, val = fold_cases(splits, fold)
        record["training_cases"], record["validation_cases"] = len(train), len(val)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        pass
    return record


def export_warnings(model: Model) -> list[str]:
    """What a user should know before sharing ``model``: members with a low cross-validation Dice,
    or whose training stopped before its schedule's end."""
    out = []
    for m in model.members:
        name = f"{m.configuration} fold {m.fold}"
        if m.validation_dice is not None and m.validation_dice < LOW_VALIDATION_DICE:
            out.append(
                f"{name}: validation Dice {m.validation_dice:.3f} (below {LOW_VALIDATION_DICE}): "
                "it may be trained too little for use"
            )
        t = m.training or {}
        if t and not t.get("finished"):
            out.append(
                f"{name}: its training did not reach the end of its schedule ({t.get('epochs_done')} epochs done)"
            )
        elif t.get("epochs_planned") and not t.get("max_time") and (t.get("epochs_done") or 0) < t["epochs_planned"]:
            out.append(f"{name}: trained {t.get('epochs_done')} of {t['epochs_planned']} planned epochs")
    return out


def workspace_model(
    dws: Any,
    plan: Plan,
    *,
    configs: Sequence[str] | None = None,
    folds: Sequence[str] | None = None,
    checkpoint: str | None = None,
) -> Model:
    """The trained runs of a dataset's workspace entry as a :class:`Model`.

    ``configs``: default the choice of ``segpipe find-best`` when one was made, else ``3d_fullres``
    when trained, else the first trained configuration. ``folds``: default every cross-validation
    fold with weights (``fold_all`` only when no fold 0-4 was trained). ``checkpoint``: ``final``
    (runs that finished) or ``best``.
    """
    checkpoint = configured(checkpoint, "infer.checkpoint")
    if checkpoint not in CHECKPOINTS:
        raise UsageError(f"checkpoint={checkpoint} is not one of {', '.join(CHECKPOINTS)}", hint="checkpoint=final")
    runs = Path(dws.root) / "runs"
    found: dict[str, list[Member]] = {}
    for name in plan.configurations:
        for fold in ["0", "1", "2", "3", "4", "all"]:
            run_dir = runs / name / f"fold_{fold}"
            weights = run_dir / f"{checkpoint}.pt"
            if weights.is_file():
                found.setdefault(name, []).append(
                    Member(
                        name,
                        fold,
                        weights,
                        _validation_dice(run_dir),
                        training=training_record(run_dir, plan, name, fold, dws),
                    )
                )
    if not found:
        unfinished = (
            sorted({str(p.parent.relative_to(runs)) for p in runs.glob("*/fold_*/last*.pt")}) if runs.is_dir() else []
        )
        hint = (
            f"finish training ({', '.join(unfinished)} stopped before the end: run the same `segpipe train` again) "
            "or use checkpoint=best"
            if unfinished and checkpoint == "final"
            else "train first: segpipe train fold=0 (and folds 1-4 for the 5-fold ensemble)"
        )
        raise StateError(f"{dws.root}: no trained model ({checkpoint}.pt in runs/<config>/fold_<k>/)", hint=hint)
    if configs is None:
        decision = read_best(dws)
        if decision and all(c in found for c in decision.get("configurations", [])):
            configs = list(decision["configurations"])
        elif "3d_fullres" in found:
            configs = ["3d_fullres"]
        else:
            configs = [next(iter(found))]
    missing = [c for c in configs if c not in found]
    if missing:
        raise StateError(
            f"{dws.root}: {', '.join(missing)} has no trained fold with {checkpoint}.pt",
            hint=f"trained: {', '.join(found)} (config=NAME), or train it: segpipe train config={missing[0]} fold=0",
        )
    members: list[Member] = []
    for c in configs:
        have = found[c]
        if folds is None:
            numbered = [m for m in have if m.fold != "all"]
            members.extend(numbered or have)
        else:
            names = [m.fold for m in have]
            absent = [f for f in folds if f not in names]
            if absent:
                raise StateError(
                    f"{dws.root}: {c} fold {', '.join(absent)} has no {checkpoint}.pt",
                    hint=f"trained folds of {c}: {', '.join(names)}; train the others or choose folds=[...]",
                )
            members.extend(m for m in have if m.fold in folds)
    members.extend(with_previous_stages(plan, configs, found, dws.root))  # the 3-D cascade's first stage
    decision = read_best(dws) or {}
    post = check_postprocessing(decision.get("postprocessing"), plan.num_classes)
    return Model(plan, members, post, origin=str(dws.root))


def read_best(dws: Any) -> dict[str, Any] | None:
    """The decision ``segpipe find-best`` wrote for this dataset (configurations, post-processing), if any."""
    path = Path(dws.best_configuration_path)
    if not path.is_file():
        return None
    data = read_json(path, what="find-best decision", hint="run `segpipe find-best` again", expect=None)
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------- model folders
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_model(
    model: Model,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    openvino: bool = False,
    quantize: Any = None,
) -> Path:
    """Write ``model`` as a self-contained folder ``out`` (see the module docstring); returns it.
    With ``openvino`` the networks are also stored converted for OpenVINO (``openvino/``, checksummed
    in ``model.json`` like the weights), so that a CPU predicting with the same OpenVINO version
    loads them without converting. With ``quantize`` (a :class:`~segpipe.inference.quantize.Calibration`)
    each is also stored quantised to int8, after the check on its fold's validation cases.

    The folder is built beside ``out`` under a temporary name and renamed into place at the end, so
    ``out`` is either complete or absent. An existing ``out`` is refused unless ``overwrite``.
    """

    target = Path(out).expanduser().resolve()
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists", hint="choose another -o folder or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} is a file", hint="choose a folder name for -o")
    if target.exists() and any(target.iterdir()) and not _is_model_folder(target):
        # --overwrite replaces a model folder, never a folder of other things (a dataset, a workspace)
        raise UsageError(
            f"{target} exists and is not a segpipe model folder: --overwrite replaces only an earlier export",
            hint="choose a new or empty -o folder",
        )
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM):
            raise  # said as a full, read-only or forbidden place by the command line
        raise StateError(
            f"-o {target}: cannot create the model folder there ({exc.strerror or exc})",
            hint="choose a writable -o folder",
        ) from None
    try:
        save_plan(model.plan, tmp / "plans.json")
        members = _write_members(model, tmp)
        post = check_postprocessing(model.postprocessing, model.plan.num_classes)
        write_json(tmp / POSTPROCESSING_FILE, post)
        info = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_VERSION,
            "dataset": model.plan.dataset,
            "labels": dict(model.plan.labels),
            "channel_names": dict(model.plan.channel_names),
            "members": members,
            "postprocessing": post,
            # every other file the model reads, checksummed as the weights are
            "files": {name: file_sha256(tmp / name) for name in CHECKSUMMED_FILES},
            "warnings": export_warnings(model),
            "versions": versions(),
        }
        if openvino or quantize is not None:
            converted = export_openvino(model.plan, members, tmp)
            stored: dict[str, Any] = {
                "version": converted["version"],
                "networks": {
                    weights: {rel: file_sha256(tmp / rel) for rel in files}
                    for weights, files in converted["networks"].items()
                },
            }
            info["openvino"] = stored
            if quantize is not None:
                from .quantize import quantize_members

                stored["int8"] = {
                    weights: {"files": {rel: file_sha256(tmp / rel) for rel in q["files"]}, **q["validation"]}
                    for weights, q in quantize_members(model.plan, members, tmp, quantize).items()
                }
        write_json(tmp / MODEL_FILE, info)
        write_text(tmp / "README.md", model_card(info))
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_members(model: Model, tmp: Path) -> list[dict[str, Any]]:
    """Each member's weights (network weights only) into ``tmp/weights/<config>/fold_<k>.pt``, and its
    ``model.json`` entry with the file's checksum and how the network was trained."""
    from ..checkpoint import load_checkpoint, save_checkpoint

    members = []
    for m in model.members:
        state = {"model": m.weights} if m.weights is not None else load_checkpoint(m.path)
        if "model" not in state:
            raise StateError(f"{m.path}: holds no network weights", hint="pass a run's final.pt or best.pt")
        rel = Path("weights") / m.configuration / f"fold_{m.fold}.pt"
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            tmp / rel,
            {
                "model": state["model"],
                "configuration": m.configuration,
                "fold": m.fold,
                "plan_config": model.plan.config(m.configuration).to_dict(),
            },
        )
        members.append(
            {
                "configuration": m.configuration,
                "fold": m.fold,
                "file": rel.as_posix(),
                "sha256": file_sha256(tmp / rel),
                "validation_dice": m.validation_dice,
                **({"training": m.training} if m.training else {}),
            }
        )
    return members


def _is_model_folder(path: Path) -> bool:
    try:
        info = json.loads((path / MODEL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == MODEL_FORMAT


def _inside(root: Path, rel: Any, what: str) -> Path:
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise StateError(f"{root / MODEL_FILE}: {what} {rel!r} is not a relative path inside the model folder")
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise StateError(
            f"{root / MODEL_FILE}: {what} {rel!r} points outside the model folder",
            hint="use a model folder written by `segpipe export`",
        )
    return path


def _checked_files(root: Path, info_path: Path, info: Mapping[str, Any]) -> dict[str, Path]:
    """The model folder's plans.json and postprocessing.json: inside the folder (a link leading out
    is refused) and, as ``model.json`` records them, unchanged. A folder written before these
    checksums were recorded is read with a warning."""
    recorded = info.get("files")
    found: dict[str, Path] = {}
    for name in CHECKSUMMED_FILES:
        if not (root / name).exists() and not (root / name).is_symlink():
            if name == "plans.json" or recorded is not None:
                raise StateError(f"{root / name}: missing from the model folder", hint="copy the whole model folder")
            continue  # an early model folder kept its post-processing in model.json only
        found[name] = _inside(root, name, "file")
    if recorded is None:
        log.warning(
            "%s: %s records no checksum of %s (an older model folder): their integrity is not checked; "
            "export the model again to record them",
            root,
            MODEL_FILE,
            " and ".join(found),
        )
        return found
    if not isinstance(recorded, dict):
        raise StateError(
            f"{info_path}: 'files' is not a mapping of file names to checksums", hint="export the model again"
        )
    for name, path in found.items():
        expected = recorded.get(name)
        if not isinstance(expected, str):
            raise StateError(f"{info_path}: records no checksum of {name}", hint="export the model again")
        if file_sha256(path) != expected:
            raise StateError(
                f"{path}: checksum differs from {MODEL_FILE} (edited, damaged or replaced)",
                hint="copy the model folder again from its source, or export the model again",
            )
    return found


def _checked_openvino(root: Path, info_path: Path, info: Mapping[str, Any]) -> None:
    """The converted networks a model folder records: inside it and unchanged (checked like the weights)."""
    entry = info.get("openvino")
    if entry is None:
        return
    networks = entry.get("networks") if isinstance(entry, dict) else None
    if not isinstance(networks, dict):
        raise StateError(f"{info_path}: 'openvino' lists no networks", hint="export the model again")
    int8 = entry.get("int8") or {}
    if not isinstance(int8, dict):
        raise StateError(f"{info_path}: 'openvino' lists its int8 networks wrongly", hint="export the model again")
    listed = [*networks.values(), *(dict(q).get("files") or {} for q in int8.values())]
    for files in listed:
        for rel, expected in dict(files).items():
            path = _inside(root, rel, "OpenVINO network file")
            if not path.is_file():
                raise StateError(f"{path}: OpenVINO network file missing", hint="copy the whole model folder")
            if file_sha256(path) != expected:
                raise StateError(
                    f"{path}: checksum differs from {MODEL_FILE} (damaged or replaced)",
                    hint="copy the model folder again from its source, or export it again",
                )


def load_model_folder(path: str | os.PathLike[str]) -> Model:
    """Read a model folder written by :func:`export_model` (checked: format, paths, checksums)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise StateError(f"{root}: no model folder here", hint="pass the folder `segpipe export -o` wrote")
    info_path = root / MODEL_FILE
    if not info_path.is_file():
        raise StateError(
            f"{root}: no {MODEL_FILE}, so this is not a segpipe model folder", hint="segpipe export -o DIR"
        )
    _inside(root, MODEL_FILE, "file")  # a model.json linking out of the folder is not this model's
    info = read_json(info_path, what="model description", hint="export the model again (segpipe export)")
    if info.get("format") != MODEL_FORMAT:
        raise StateError(f"{info_path}: not a segpipe model description", hint="export the model again")
    if int(info.get("format_version", 0)) > MODEL_VERSION:
        raise StateError(
            f"{info_path}: written by a newer segpipe (format {info.get('format_version')})", hint="upgrade segpipe"
        )
    files = _checked_files(root, info_path, info)
    _checked_openvino(root, info_path, info)
    plan = load_plan(files["plans.json"])
    raw_members = info.get("members")
    if not isinstance(raw_members, list) or not raw_members:
        raise StateError(f"{info_path}: lists no trained network", hint="export the model again")
    members = []
    for entry in raw_members:
        if not isinstance(entry, dict):
            raise StateError(f"{info_path}: a member entry is not an object")
        config, fold = str(entry.get("configuration")), str(entry.get("fold"))
        if config not in plan.configurations:
            raise StateError(f"{info_path}: member {config} is not a configuration of its plans.json")
        file = _inside(root, entry.get("file"), "weight file")
        if not file.is_file():
            raise StateError(f"{file}: weight file missing", hint="copy the whole model folder")
        expected = entry.get("sha256")
        if expected is None and "files" in info:
            raise StateError(
                f"{info_path}: weight file {entry.get('file')} has no checksum", hint="export the model again"
            )
        digest = file_sha256(file)
        if expected is not None and digest != expected:
            raise StateError(
                f"{file}: checksum differs from {MODEL_FILE} (damaged or replaced)",
                hint="copy the model folder again from its source",
            )
        dice = entry.get("validation_dice")
        training = entry.get("training") if isinstance(entry.get("training"), dict) else None
        members.append(
            Member(config, fold, file, float(dice) if isinstance(dice, (int, float)) else None, digest, training)
        )
    post_path = files.get(POSTPROCESSING_FILE)
    decision = (
        read_json(post_path, what="post-processing decision", hint="export the model again")
        if post_path is not None
        else info.get("postprocessing")
    )
    try:
        post = check_postprocessing(decision, plan.num_classes)
    except ConfigError as exc:
        raise StateError(f"{post_path or info_path}: {exc.message}", hint="export the model again") from None
    return Model(plan, members, post, origin=str(root), info=info)
