"""Configuration: Hydra's compose API over the ``conf/`` tree shipped inside the package.

Every default lives once, in ``conf/*.yaml``; the schema below only states each setting's
type. ``compose_config(overrides)`` returns an OmegaConf ``DictConfig``; overrides are Hydra
``key=value`` strings, and a bare key that exists in exactly one place is expanded to its full
path (``gpu_memory_gb=24`` → ``planner.gpu_memory_gb=24``; ``configuration=`` is an alias of
``config=``). Each command accepts only the settings it uses (:data:`COMMAND_SETTINGS`):
anything else is refused with the list of what it takes, so no setting is silently ignored.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from .errors import ConfigError, UsageError
from .settings.conf import all_settings, compose, composed_defaults, selectable_groups, setting_comments
from .workspace import DEFAULT_WORK_DIR, resolve_work_dir  # noqa: F401  (re-exported)

#: Aliases accepted on the command line and in the Python API: alias → canonical key.
ALIASES = {"configuration": "config"}

#: The settings each command honours: full keys, or a group name for every key of that group.
#: A command given any other setting refuses it (exit 2), naming the ones it takes.
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "info": ("dicom",),
    "check": ("num_workers",),
    "plan": ("work_dir", "dataset_name", "num_workers", "force", "planner"),
    "preprocess": ("work_dir", "dataset", "config", "num_workers", "force"),
    "train": ("work_dir", "dataset", "config", "num_workers", "train", "optim", "loss", "trainer"),
    "infer": ("work_dir", "dataset", "config", "dicom", "infer", "trainer"),
    "evaluate": ("evaluate",),
    "find-best": ("work_dir", "dataset"),
    "export": (
        "work_dir",
        "dataset",
        "config",
        "infer.folds",
        "infer.checkpoint",
        "infer.runtime",
        "infer.quantize",
        "infer.quantize_tolerance",
    ),
    "demo": ("work_dir", "train.epochs", "train.iterations_per_epoch"),
    "config": ("*",),
}


#: The demo's training schedule: 300 steps of AdamW (lr 0.003, poly decay; on so short a schedule it
#: learns the small lesion far sooner than nnU-Net's SGD), full-case validation every 4 epochs;
#: about 7 minutes on two CPU cores. ``epochs=`` and ``iterations_per_epoch=`` change it.
DEMO_SCHEDULE: dict[str, Any] = {
    "epochs": 12,
    "iterations_per_epoch": 25,
    "val_batches": 2,
    "val_every": 4,
    "seed": 0,
    "optim": "adamw",
    "optim.lr": 0.003,
}

#: What a setting's default means for one command, where the shared comment in conf/ would mislead:
#: (command, full key) → (default shown, comment)
COMMAND_HELP: dict[tuple[str, str], tuple[Any, str]] = {
    ("demo", "train.epochs"): (DEMO_SCHEDULE["epochs"], "the demo's schedule: epochs × iterations_per_epoch steps"),
    ("demo", "train.iterations_per_epoch"): (DEMO_SCHEDULE["iterations_per_epoch"], ""),
    ("train", "config"): (
        None,
        "the configuration to train; null = 3d_fullres when planned, else the first planned one",
    ),
    ("preprocess", "config"): (None, "configurations to preprocess; null = every planned one"),
    ("infer", "config"): (
        None,
        "configuration(s) to segment with; null = find-best's choice, else 3d_fullres when trained, else the first trained",
    ),
    ("export", "config"): (
        None,
        "configuration(s) to export; null = find-best's choice, else 3d_fullres when trained, else the first trained",
    ),
}


# ---------------------------------------------------------------------------- schema (types only)
@dataclass
class DicomSchema:
    series: Optional[str] = MISSING  # noqa: UP045  (OmegaConf needs typing.Optional)
    modality: Optional[str] = MISSING  # noqa: UP045
    allow_uneven_spacing: bool = MISSING
    allow_few_slices: bool = MISSING
    allow_gantry_tilt: bool = MISSING
    spacing_tolerance: float = MISSING


@dataclass
class TrainSchema:
    fold: str = MISSING  # 0..4 or "all": validated by the trainer
    epochs: int = MISSING
    iterations_per_epoch: int = MISSING
    val_every: int = MISSING
    val_batches: Optional[int] = MISSING  # noqa: UP045  (null: scaled with iterations_per_epoch)
    grad_clip: Optional[float] = MISSING  # noqa: UP045
    progress: Any = MISSING  # auto, true or false: validated by the trainer
    tensorboard: Any = MISSING  # auto, true or false
    batch_size: Optional[int] = MISSING  # noqa: UP045
    device: str = MISSING
    precision: str = MISSING
    max_time: Optional[str] = MISSING  # noqa: UP045
    checkpoint_every: Optional[str] = MISSING  # noqa: UP045
    case_sampling: str = MISSING
    hardness_beta: float = MISSING
    seed: int = MISSING
    deterministic: bool = MISSING


@dataclass
class InferSchema:
    folds: Any = MISSING  # null, a fold, a list of folds or "all": validated by the predictor
    checkpoint: str = MISSING
    tta: bool = MISSING
    overlap: float = MISSING
    window: str = MISSING
    batch_size: Optional[int] = MISSING  # noqa: UP045
    device: str = MISSING
    runtime: str = MISSING
    precision: str = MISSING
    quantize: Optional[str] = MISSING  # noqa: UP045
    quantize_tolerance: float = MISSING
    format: str = MISSING
    probabilities: bool = MISSING
    report: bool = MISSING
    strict: bool = MISSING


@dataclass
class EvaluateSchema:
    tolerance_mm: Any = MISSING  # mm for every class, or {class: mm}
    images: Optional[str] = MISSING  # noqa: UP045
    ignore_label: Optional[int] = MISSING  # noqa: UP045
    strict: bool = MISSING


@dataclass
class RootSchema:
    work_dir: str = MISSING
    dataset: Optional[str] = MISSING  # noqa: UP045
    dataset_name: Optional[str] = MISSING  # noqa: UP045
    num_workers: Optional[int] = MISSING  # noqa: UP045
    config: Any = MISSING  # one configuration name or a list of them
    force: bool = MISSING
    dicom: DicomSchema = field(default_factory=DicomSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    infer: InferSchema = field(default_factory=InferSchema)
    evaluate: EvaluateSchema = field(default_factory=EvaluateSchema)
    # planner settings are typed and validated by segpipe.planning.PlanSettings
    planner: dict[str, Any] = field(default_factory=dict)


def _selection(group: str, option: Any) -> str:
    """``group=option`` for a selectable group, refusing an unknown option with the valid list."""
    options = selectable_groups()[group]
    if str(option) not in options:
        raise ConfigError(f"unknown {group} {option!r}", hint=f"valid: {', '.join(options)}")
    return f"{group}={option}"


def _split_selections(items: Iterable[tuple[str, Any]]) -> tuple[list[str], list[tuple[str, Any]]]:
    """Group selections (``loss=tversky``) apart from settings; a selection names a known option."""
    groups = selectable_groups()
    selections, rest = [], []
    for key, value in items:
        if key in groups and not isinstance(value, Mapping):
            selections.append(_selection(key, value))
        else:
            rest.append((key, value))
    return selections, rest


def expand_key(key: str, known: Iterable[str] | None = None) -> str:
    """The full key of a bare or aliased ``key``; ConfigError for unknown or ambiguous keys."""
    known = list(known if known is not None else all_settings())
    bare = ALIASES.get(key, key)
    if bare in known:
        return bare
    groups = {k.split(".", 1)[0] for k in known if "." in k}
    if bare in groups:
        raise ConfigError(
            f"{bare!r} is a group of settings, not one setting",
            hint=f"set one of its keys, e.g. {next(k for k in known if k.startswith(bare + '.'))}=...",
        )
    matches = [k for k in known if k.endswith("." + bare)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"setting {bare!r} is ambiguous", hint=f"use one of {', '.join(matches)}")
    leaves = [k.rsplit(".", 1)[-1] for k in known]
    candidates = list(dict.fromkeys([*known, *leaves, *ALIASES]))
    close = list(dict.fromkeys(ALIASES.get(c, c) for c in difflib.get_close_matches(bare, candidates, n=4)))[:3]
    raise ConfigError(
        f"unknown setting {key!r}",
        hint=("did you mean " + " or ".join(close) + "? " if close else "") + "`segpipe config` lists every setting",
    )


def _expand_for(key: str, known: list[str], command: str | None) -> str:
    """:func:`expand_key`, a bare key looked up first among the settings ``command`` takes (so
    ``device=`` is ``infer.device`` for ``infer`` and ``train.device`` for ``train``)."""
    if command is not None:
        mine = [k for k in known if accepts(command, k)]
        try:
            return expand_key(key, mine)
        except ConfigError:
            pass  # not one of the command's: resolved among all, and refused by check_command
    return expand_key(key, known)


#: settings whose value is a file-system path or a dataset name: taken verbatim from the command
#: line (spaces, accents, commas, brackets and quotes included), never parsed as Hydra syntax
PATH_SETTINGS = frozenset({"work_dir", "dataset", "dataset_name", "evaluate.images"})


def _quoted_path(value: str) -> str:
    """A path as one quoted Hydra string (``a b/ü`` → ``'a b/ü'``), unless already quoted, null or
    an interpolation (``${oc.env:HOME}/work``)."""
    if value[:1] in ("'", '"') or value in ("null", "") or "${" in value:
        return value
    # Hydra's quoted strings: a backslash is literal except in a run just before a quote (or the
    # closing quote), which must be doubled; a quote inside is escaped
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
    return "'" + escaped + "'"


def expand_overrides(overrides: list[str], known: list[str] | None = None, command: str | None = None) -> list[str]:
    """Full-key Hydra overrides for ``overrides``: group selections first, then settings.

    ``known`` (the valid full keys) defaults to those of the configuration the selections give;
    with ``command``, a bare key is first looked up among that command's settings.
    """
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not key=value", hint="write overrides as key=value, e.g. fold=0")
    selections, settings = _split_selections(ov.split("=", 1) for ov in overrides)  # type: ignore[misc]
    if known is None:
        known = all_settings(selections)
    out: list[str] = list(selections)
    for ov in (f"{k}={v}" for k, v in settings):
        key, value = ov.split("=", 1)
        prefix = key[: len(key) - len(key.lstrip("+~"))]
        bare = key[len(prefix) :]
        if prefix:
            raise ConfigError(
                f"override {ov!r}: adding (+) or deleting (~) settings is not supported",
                hint="set an existing setting as key=value; `segpipe config` lists them",
            )
        if "/" in bare:
            raise ConfigError(
                f"override {ov!r}: config group selection is not available here",
                hint="`segpipe config` lists every setting",
            )
        full = _expand_for(bare, known, command)
        if full in PATH_SETTINGS:
            value = _quoted_path(value)
        elif "," in value and value[:1] not in "[{'\"" and not value.startswith("${"):
            value = f"[{value}]"  # `configurations=3d_fullres,2d` is a list (Hydra would read a sweep)
        group, _, leaf = full.partition(".")
        if leaf == "name" and group in selectable_groups():
            if bare != full:  # a bare `name=`: not a setting of its own, whatever group has one
                where = f"`segpipe {command} --help`" if command else "`segpipe config`"
                raise ConfigError(
                    f"unknown setting {bare!r}",
                    hint=f"{where} lists the settings; a {group} is chosen with {group}=OPTION",
                )
            raise ConfigError(f"{full} names the selected {group} option", hint=f"select another with {group}=OPTION")
        out.append(full + "=" + value)
    return out


def _group_of(full_key: str) -> str:
    return full_key.split(".", 1)[0]


# settings of a group that a command taking the group still does not use: what only an export does
COMMAND_EXCLUDES = {"infer": ("infer.quantize", "infer.quantize_tolerance")}


def accepts(command: str, full_key: str) -> bool:
    allowed = COMMAND_SETTINGS.get(command, ())
    if full_key in COMMAND_EXCLUDES.get(command, ()):
        return False
    return "*" in allowed or full_key in allowed or _group_of(full_key) in allowed


def command_settings(command: str) -> list[str]:
    """The full keys ``command`` honours, in configuration order."""
    keys = [k for k in all_settings() if accepts(command, k)]
    return sorted(keys, key=lambda k: ("." in k, keys.index(k)))  # top-level settings first


def check_command(command: str, full_keys: Iterable[str]) -> None:
    """Refuse settings ``command`` does not use (they would otherwise be silently ignored)."""
    bad = [k for k in full_keys if not accepts(command, k)]
    if not bad:
        return
    takes = command_settings(command)
    shown = ", ".join(k.rsplit(".", 1)[-1] if "." in k else k for k in takes) or "no settings"
    extra = ""
    if any(_group_of(k) == "dicom" for k in bad) and command in ("check", "plan", "preprocess", "train"):
        extra = '; DICOM read options of a dataset go in its dataset.json ("dicom": {...})'
    raise UsageError(
        f"`segpipe {command}` does not use the setting(s) {', '.join(bad)}", hint=f"it takes: {shown}{extra}"
    )


def _validate(cfg: Any) -> Any:
    """Check every setting's type against the schema; returns a plain (non-structured) config."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    groups = {k: cfg[k] for k in selectable_groups() if k in cfg}
    if groups:
        plain: dict[str, Any] = OmegaConf.to_container(cfg, resolve=False)  # type: ignore[assignment]
        cfg = OmegaConf.create({k: v for k, v in plain.items() if k not in groups})
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RootSchema), cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        value = getattr(exc, "value", None)
        want = _expected_type(str(key))
        raise ConfigError(
            f"invalid value {value!r} for setting {key}" + (f" (expected {want})" if want else ""),
            hint="`segpipe config` shows every setting with its default",
        ) from None
    out: Any = OmegaConf.create(OmegaConf.to_container(merged, resolve=False))
    for key, node in groups.items():  # their options' parameters are checked by their builders
        out[key] = node
    _check_values(OmegaConf.to_container(out, resolve=True))
    from .planning.settings import PlanSettings

    PlanSettings.from_mapping(OmegaConf.to_container(out.planner, resolve=True))  # type: ignore[arg-type]
    return out


#: the longest file name (one path component, in bytes) and path most file systems take
NAME_MAX, PATH_MAX = 255, 4096


def _check_values(values: Any, prefix: str = "") -> None:
    """Values no setting can use, refused naming the setting: NaN or infinite numbers, a negative
    ``seed``, and paths with a NUL byte or a name longer than the file system takes."""
    if isinstance(values, Mapping):
        for key, value in values.items():
            _check_values(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
        return
    if isinstance(values, float) and not math.isfinite(values):
        raise ConfigError(f"{prefix}={values} is not a finite number", hint="`segpipe config` shows its default")
    if prefix.rsplit(".", 1)[-1] == "seed" and isinstance(values, int) and not 0 <= values < 2**32:
        raise ConfigError(f"{prefix}={values}: a seed is a whole number from 0 to 4294967295", hint="seed=0")
    if prefix in PATH_SETTINGS and isinstance(values, str):
        check_path_text(values, f"{prefix}=")


def check_path_text(text: str, what: str) -> None:
    """Refuse a path no file system takes (a NUL byte, a name over 255 bytes, over 4096 in all),
    naming ``what`` (the setting or argument), before anything tries to create it."""
    if "\0" in text:
        raise ConfigError(f"{what} holds a NUL byte", hint="remove it from the path")
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in text.split("/")), default=0)
    if longest > NAME_MAX or len(text.encode("utf-8", "surrogateescape")) > PATH_MAX:
        shown = text if len(text) <= 60 else text[:40] + "…" + text[-10:]
        raise ConfigError(
            f"{what}{shown}: too long for a file system ({len(text)} characters, a name at most {NAME_MAX} bytes)",
            hint="use a shorter name",
        )


def _expected_type(full_key: str) -> str:
    import typing

    obj: Any = RootSchema
    for part in full_key.split("."):
        hints = typing.get_type_hints(obj) if isinstance(obj, type) else {}
        if part not in hints:
            return ""
        obj = hints[part]
    text = getattr(obj, "__name__", None) or str(obj).replace("typing.", "")
    return text.replace("Optional[", "").replace("]", " or null") if "Optional" in str(obj) else text


def compose_config(overrides: Iterable[str] = (), *, command: str | None = None) -> Any:
    """Compose ``config.yaml`` with ``overrides``; returns a resolved, type-checked ``DictConfig``.

    With ``command``, settings that command does not use are refused.
    """
    from omegaconf import OmegaConf

    overrides = list(overrides)
    expanded = expand_overrides(overrides, command=command)
    if command is not None:
        check_command(command, [ov.split("=", 1)[0] for ov in expanded])
    try:
        cfg = compose(expanded)
    except Exception as exc:  # Hydra's errors: override grammar, missing group options, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"invalid override(s) {' '.join(overrides)}: {msg}", hint="`segpipe config` lists every setting"
        ) from None
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:
        raise ConfigError(f"cannot resolve the configuration: {exc}") from None
    return _validate(cfg)


def given_settings(command: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Map Python keyword settings (bare, aliased or full keys) to full keys, refusing unknown ones."""
    selections, rest = _split_selections((ALIASES.get(k, k), v) for k, v in settings.items())
    known = all_settings(selections)
    out: dict[str, Any] = {s.split("=", 1)[0]: s.split("=", 1)[1] for s in selections}
    for key, value in rest:
        full = _expand_for(key, known, command)
        if full in out:
            raise ConfigError(f"setting {full} given twice ({key!r} and another name for it)")
        out[full] = value
    check_command(command, out)
    return out


def settings_config(command: str, settings: Mapping[str, Any]) -> Any:
    """The defaults with ``settings`` (Python values, bare or full keys) merged in, type-checked."""
    from omegaconf import OmegaConf

    full = given_settings(command, settings)
    groups = selectable_groups()
    selections = tuple(f"{k}={v}" for k, v in full.items() if k in groups)
    base = OmegaConf.create(OmegaConf.to_container(composed_defaults(selections)[0], resolve=False))
    for key, value in full.items():
        if key in groups:
            continue
        if key.startswith("planner.") and isinstance(value, (tuple, list, dict)):
            value = OmegaConf.create(value) if isinstance(value, dict) else list(value)
        OmegaConf.update(base, key, value, merge=False)
    try:
        OmegaConf.resolve(base)
    except Exception as exc:
        raise ConfigError(f"cannot resolve the configuration: {exc}") from None
    return _validate(base)


def to_container(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- help text
def settings_help(command: str) -> str:
    """Lines ``key=default  comment`` for each setting ``command`` takes (generated from conf/)."""
    from omegaconf import OmegaConf

    base = composed_defaults()[0]
    comments = setting_comments()
    rows = []
    groups = selectable_groups()
    for key in command_settings(command):
        group, _, leaf = key.partition(".")
        if group in groups and leaf == "name":  # the option itself: shown as group=option
            rows.append((f"{group}={OmegaConf.select(base, key)}", f"one of {', '.join(groups[group])}"))
            continue
        node = OmegaConf.select(base, key, throw_on_resolution_failure=False)
        raw = OmegaConf.to_container(base, resolve=False)
        for part in key.split("."):
            raw = raw.get(part) if isinstance(raw, dict) else None
        default = raw if isinstance(raw, str) and raw.startswith("${") else node
        text = "null" if default is None else (str(default).lower() if isinstance(default, bool) else str(default))
        if isinstance(default, str) and default.startswith("${oc.env:"):
            var, _, fallback = default[len("${oc.env:") : -1].partition(",")
            text = f"${var} or {fallback}"
        comment = comments.get(key, "")
        if (command, key) in COMMAND_HELP:
            shown, comment = COMMAND_HELP[command, key]
            text = "null" if shown is None else str(shown)
        short = key.rsplit(".", 1)[-1]
        rows.append((f"{short}={text}", comment))
    if not rows:
        return "  (no settings)"
    width = min(max(len(a) for a, _ in rows), 40)
    return "\n".join(f"  {a.ljust(width)}  {b}".rstrip() for a, b in rows)
