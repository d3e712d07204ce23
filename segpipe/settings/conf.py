"""The one reader of ``conf/``: where it lies, each group's defaults, the composed defaults, the
comments that document each setting, and the ``trainer`` group's check.

Every default is written once, in ``conf/*.yaml``. Library code that needs one reads it from here
(``group_defaults("planner")``), so editing a YAML file changes the command line and the Python
API alike. This module knows nothing of the commands: which command takes which setting is the
command line's business (:mod:`segpipe.config`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def compose(overrides: list[str]) -> Any:
    """Hydra's composition of ``config.yaml`` with ``overrides`` (full ``key=value`` strings),
    unresolved; Hydra's own errors pass through."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="segpipe"):
            return hydra_compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def config_dir() -> Path:
    """The folder holding ``config.yaml`` (inside the installed package, or the repo's ``conf/``)."""
    path = Path(str(resources.files("segpipe.conf")))
    if not (path / "config.yaml").is_file():  # pragma: no cover - broken installation
        raise ConfigError(f"{path}: config.yaml missing; the installation is broken", hint="reinstall segpipe")
    return path


@cache
def group_defaults(group: str) -> dict[str, Any]:
    """The defaults of one config group as written in ``conf/<group>/default.yaml``.

    Library code that needs a default (``PlanSettings``, the DICOM reader) reads it from here, so
    each default is written once, in ``conf/``.
    """
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(config_dir() / group / "default.yaml"), resolve=True)
    if not isinstance(data, dict):  # pragma: no cover - broken installation
        raise ConfigError(f"{config_dir() / group / 'default.yaml'}: not a mapping", hint="reinstall segpipe")
    return {str(k): v for k, v in data.items()}


@cache
def option_defaults(group: str, option: str) -> dict[str, Any]:
    """The settings of one option of a selectable group as ``conf/<group>/<option>.yaml`` writes
    them (``option_defaults("loss", "tversky")``); empty when there is no such file."""
    from omegaconf import OmegaConf

    path = config_dir() / group / f"{option}.yaml"
    if not path.is_file():
        return {}
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):  # pragma: no cover - broken installation
        raise ConfigError(f"{path}: not a mapping", hint="reinstall segpipe")
    return {str(k): v for k, v in data.items()}


def setting_default(key: str) -> Any:
    """The default of one setting as ``conf/`` writes it, by its full key (``"infer.overlap"``,
    ``"force"``, ``"train.seed"``), resolved."""
    from omegaconf import OmegaConf

    base = composed_defaults()[0]
    if OmegaConf.select(base, key, throw_on_missing=False, default=_ABSENT) is _ABSENT:
        raise KeyError(f"no setting {key!r} in conf/")
    value = OmegaConf.select(base, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


_ABSENT = object()


def configured(value: Any, key: str) -> Any:
    """``value``, or when it is None the default of setting ``key`` (:func:`setting_default`): how a
    function of the library takes a setting whose default is written once, in ``conf/``."""
    return setting_default(key) if value is None else value


def _flatten(cfg: Any, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for k in cfg:
        full = f"{prefix}{k}"
        v = cfg._get_node(k)
        if isinstance(v, DictConfig):
            keys.extend(_flatten(v, full + "."))
        else:
            keys.append(full)
    return keys


@lru_cache(maxsize=1)
def selectable_groups() -> dict[str, tuple[str, ...]]:
    """Config groups with several options (``conf/loss/tversky.yaml`` …): group → option names.

    ``loss=tversky`` selects an option; its keys (``alpha=0.3``) are then settings like any other.
    Groups with one ``default.yaml`` (planner, dicom, train) only hold settings.
    """
    out: dict[str, tuple[str, ...]] = {}
    for folder in sorted(p for p in config_dir().iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = tuple(sorted(p.stem for p in folder.glob("*.yaml")))
        if options and options != ("default",):
            out[folder.name] = options
    return out


@lru_cache(maxsize=16)
def composed_defaults(selections: tuple[str, ...] = ()) -> tuple[Any, tuple[str, ...]]:
    """The composed defaults (unresolved) with group ``selections`` (``("loss=tversky",)``), and
    every setting's full key."""
    base = compose(list(selections))
    return base, tuple(_flatten(base))


def all_settings(selections: Iterable[str] = ()) -> list[str]:
    """Every setting's full key (``work_dir``, ``planner.gpu_memory_gb``, ``train.fold``, …)."""
    return list(composed_defaults(tuple(selections))[1])


def default_option(group: str) -> str:
    """The option of ``group`` the configuration selects by default (``conf/config.yaml``)."""
    return str(composed_defaults()[0][group]["name"])


_COMMENT_RE = re.compile(r"^(\s*)([A-Za-z0-9_]+):\s*(.*?)\s*(?:#\s*(.*))?$")


@lru_cache(maxsize=1)
def setting_comments() -> dict[str, str]:
    """The trailing ``# comment`` of every setting in ``conf/`` (full key → text), for help."""
    out: dict[str, str] = {}
    root = config_dir()
    base = composed_defaults()[0]

    def default_last(p: Path) -> tuple[str, bool]:  # the selected option's comments win
        group = p.parent.name
        return group, group in base and p.stem == str(base[group].get("name", ""))

    files = [(root / "config.yaml", "")] + [
        (p, p.parent.name + ".") for p in sorted(root.glob("*/*.yaml"), key=default_last)
    ]
    for path, prefix in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            m = _COMMENT_RE.match(line)
            if m and not m.group(1) and m.group(2) != "defaults" and m.group(4):
                out[prefix + m.group(2)] = m.group(4).strip()
    return out


def process_settings(value: Any, *, single: str, several: str) -> dict[str, Any]:
    """The ``trainer`` group checked: ``{"name": "single"|"ddp", "devices": N, "num_nodes": M}`` from a
    name or a composed option. ``single``/``several`` word the refusal of several devices with
    ``trainer=single`` for the command (``"trains in one process"``, ``"trains in several"``)."""
    t: dict[str, Any] = dict(value) if isinstance(value, Mapping) else {"name": str(value)}
    t.setdefault("name", "single")
    t.setdefault("devices", 1 if t["name"] == "single" else 2)
    t.setdefault("num_nodes", 1)
    if t["name"] not in ("single", "ddp"):
        raise ConfigError(f"trainer={t['name']!r} is not a trainer", hint="trainer=single, or trainer=ddp devices=N")
    for key in ("devices", "num_nodes"):
        try:
            t[key] = int(t[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={t[key]!r} is not a whole number") from None
        if t[key] < 1:
            raise ConfigError(f"{key}={t[key]} must be at least 1")
    if t["name"] == "single" and (t["devices"], t["num_nodes"]) != (1, 1):
        raise ConfigError(
            f"devices={t['devices']} num_nodes={t['num_nodes']}: trainer=single {single}",
            hint=f"trainer=ddp devices=N num_nodes=M {several}",
        )
    return t
