"""The settings of one training run: every default read from where it is written once (``conf/``),
each value checked before any work, and the ones a resumed run must keep."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import runtime
from ..checkpoint import to_plain
from ..errors import ConfigError, StateError
from ..io.jsonio import read_json
from ..workspace import SETTINGS_FILE
from .optim import parse_duration

#: ``val_batches`` left unset (null): one validation patch batch per ITERATIONS_PER_VAL_BATCH training
#: iterations, rounded up, at most MAX_VAL_BATCHES (nnU-Net validates on 50 batches after 250 iterations)
ITERATIONS_PER_VAL_BATCH, MAX_VAL_BATCHES = 5, 50

#: training settings beyond the ``train`` group (whose defaults are read from
#: ``conf/train/default.yaml``): the loss and optimizer options default to the ones the
#: configuration selects (``conf/config.yaml``), their parameters to that option's file
_RUN_ONLY_DEFAULTS: dict[str, Any] = {
    "loss_params": {},
    "optim_params": {},
    "lr": None,
    "num_workers": None,
}


def default_settings() -> dict[str, Any]:
    """Every training setting's default, each read from where it is written once (``conf/``)."""
    from ..settings import default_option, group_defaults

    out = {k: v for k, v in group_defaults("train").items() if k != "fold"}
    out.update(_RUN_ONLY_DEFAULTS)
    out["loss"] = default_option("loss")
    out["optim"] = default_option("optim")
    out["trainer"] = default_option("trainer")
    return out


#: settings that change what is trained; a resumed run must keep them
RESUME_KEYS = (
    "iterations_per_epoch",
    "batch_size",
    "loss",
    "loss_params",
    "optim",
    "optim_params",
    "lr",
    "seed",
    "case_sampling",
    "hardness_beta",
)


def train_settings(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved training settings: the defaults from ``conf/`` (:func:`default_settings`) with
    ``settings`` applied; unknown keys are a :class:`ConfigError` listing the valid ones."""
    out = default_settings()
    given = {k: v for k, v in dict(settings or {}).items() if k != "fold"}
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}", hint=f"valid: {', '.join(sorted(out))}")
    out.update(to_plain(given))
    for key in ("epochs", "iterations_per_epoch", "val_every", "val_batches"):
        if key == "val_batches" and out[key] is None:
            continue  # scaled with the epoch's length below
        try:
            value = int(out[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={out[key]!r} is not a whole number") from None
        if value < 1:
            raise ConfigError(f"{key}={out[key]!r} must be at least 1")
        out[key] = value
    if out["val_batches"] is None:
        out["val_batches"] = scaled_val_batches(out["iterations_per_epoch"])
    if out["batch_size"] is not None and int(out["batch_size"]) < 1:
        raise ConfigError(f"batch_size={out['batch_size']!r} must be at least 1 (or null for the plan's)")
    if out["device"] not in runtime.DEVICES:
        raise ConfigError(f"device={out['device']!r} is not valid", hint="valid: cpu, cuda, auto")
    if str(out["precision"]) not in runtime.PRECISIONS:
        raise ConfigError(
            f"precision={out['precision']!r} is not valid", hint=f"valid: {', '.join(runtime.PRECISIONS)}"
        )
    for key in ("max_time", "checkpoint_every"):
        if out[key] is not None:
            parse_duration(out[key])  # a bad duration is refused before any work
    for key in ("progress", "tensorboard"):
        out[key] = _tristate(key, out[key])
    out["trainer"] = _trainer_settings(out["trainer"])
    if out["case_sampling"] not in ("uniform", "hardness"):
        raise ConfigError(
            f"case_sampling={out['case_sampling']!r} is not valid", hint="case_sampling=uniform or hardness"
        )
    beta = out["hardness_beta"]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ConfigError(f"hardness_beta={beta!r} must be a number ≥ 0")
    if out["tensorboard"] is True and not tensorboard_installed():
        raise ConfigError(
            "tensorboard=true needs the tensorboard package", hint="pip install tensorboard, or tensorboard=auto"
        )
    return out


def scaled_val_batches(iterations_per_epoch: int) -> int:
    """Validation patch batches per epoch when ``val_batches`` is not set: one per
    :data:`ITERATIONS_PER_VAL_BATCH` training iterations, rounded up, at most :data:`MAX_VAL_BATCHES`
    (nnU-Net's 50 for its 250 iterations), so that a short epoch is not mostly validation."""
    return max(1, min(MAX_VAL_BATCHES, -(-int(iterations_per_epoch) // ITERATIONS_PER_VAL_BATCH)))


def _trainer_settings(value: Any) -> dict[str, Any]:
    """``{"name": "single"|"ddp", "devices": N, "num_nodes": M}`` from a name or a composed option."""
    from ..settings import process_settings

    return process_settings(value, single="trains in one process", several="trains in several")


def _tristate(key: str, value: Any) -> bool | str:
    """``auto``, or a boolean from true/false/yes/no/1/0 (as typed on the command line)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{key}={value!r} is not valid", hint=f"{key}=auto, true or false")


def tensorboard_installed() -> bool:
    """Whether TensorBoard's writer (tensorboard or tensorboardX) is installed."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def named_option(choice: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"name": ..., **params}`` from a name (``"sgd"``) or a composed group (``{"name": "sgd", "lr": 0.01}``)."""
    if isinstance(choice, Mapping):
        out = dict(choice)
        if "name" not in out:
            raise ConfigError(f"{out}: the option has no name", hint="give e.g. optim=sgd or loss=dice_ce")
        return {**out, **dict(params)}
    return {"name": str(choice), **dict(params)}


def check_same_settings(run_dir: Path, s: Mapping[str, Any]) -> None:
    """Refuse to resume a run with other settings than it was started with (:data:`RESUME_KEYS`)."""
    path = run_dir / SETTINGS_FILE
    if not path.is_file():
        return
    saved = read_json(path, what="run settings", hint="start again with overwrite=true").get("settings", {})
    changed = [f"{k} {saved.get(k)!r} → {s[k]!r}" for k in RESUME_KEYS if k in saved and saved.get(k) != s[k]]
    if changed:
        raise StateError(
            f"the run in {run_dir} was started with other settings ({'; '.join(changed)})",
            hint="resume with the same settings, or start again with overwrite=true",
        )


def check_optim_and_loss(s: Mapping[str, Any], cfg: Any, ignore: Any) -> None:
    """Build the optimizer settings and the loss once, as the run will, so that a value neither takes
    (``momentum=2``, ``alpha=-1``) is refused before anything of the run is written."""
    from ..losses import build_loss
    from .optim import optim_settings

    optim = named_option(s["optim"], s["optim_params"])
    if s["lr"] is not None:
        optim["lr"] = s["lr"]
    optim_settings(optim.pop("name", None), **optim)
    loss = named_option(s["loss"], s["loss_params"])
    build_loss(str(loss.pop("name")), context={"batch_dice": cfg.batch_dice, "ignore_index": ignore}, **loss)
