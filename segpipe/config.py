"""Configuration: Hydra's compose API over the ``conf/`` tree shipped inside the package.

``compose_config(overrides)`` returns an OmegaConf ``DictConfig``. Overrides are Hydra
``key=value`` strings; a bare key that exists in exactly one config group is expanded to its
full path (``gpu_memory_gb=24`` → ``planner.gpu_memory_gb=24``). Unknown keys raise
:class:`~segpipe.errors.ConfigError` naming the valid ones.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_WORK_DIR = "segpipe_work"


def config_dir() -> Path:
    """The folder holding ``config.yaml`` (inside the installed package, or the repo's ``conf/``)."""
    path = Path(str(resources.files("segpipe.conf")))
    if not (path / "config.yaml").is_file():  # pragma: no cover - broken installation
        raise ConfigError(f"{path}: config.yaml missing; the installation is broken", hint="reinstall segpipe")
    return path


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


def _expand(overrides: list[str], known: list[str]) -> list[str]:
    out = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not key=value", hint="write overrides as key=value, e.g. fold=0")
        key, value = ov.split("=", 1)
        bare = key.lstrip("+~")
        if bare in known or "/" in bare:
            out.append(ov)
            continue
        matches = [k for k in known if k.endswith("." + bare)]
        if len(matches) == 1:
            out.append(key[: len(key) - len(bare)] + matches[0] + "=" + value)
            continue
        if len(matches) > 1:
            raise ConfigError(f"override key {bare!r} is ambiguous", hint=f"use one of {', '.join(matches)}")
        close = difflib.get_close_matches(bare, known + [k.rsplit(".", 1)[-1] for k in known], n=3)
        raise ConfigError(
            f"unknown setting {bare!r}",
            hint=("did you mean " + " or ".join(close) + "? " if close else "") + "`segpipe config` lists every setting",
        )
    return out


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Compose ``config.yaml`` with ``overrides``; returns a resolved ``DictConfig``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="segpipe"):
            base = compose(config_name="config")
            expanded = _expand(overrides, _flatten(base))
            cfg = compose(config_name="config", overrides=expanded)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra's errors: override grammar, missing group options, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"invalid override(s) {' '.join(overrides)}: {msg}",
                          hint="`segpipe config` lists every setting") from None
    finally:
        GlobalHydra.instance().clear()
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:
        raise ConfigError(f"cannot resolve the configuration: {exc}") from None
    return cfg


def to_container(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def resolve_work_dir(work_dir: str | os.PathLike[str] | None) -> Path:
    """The workspace folder: ``work_dir`` if given, else ``$SEGPIPE_WORK``, else ``./segpipe_work``."""
    if work_dir is None:
        work_dir = os.environ.get("SEGPIPE_WORK") or DEFAULT_WORK_DIR
    return Path(work_dir).expanduser().resolve()
