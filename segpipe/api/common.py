"""What the API's functions share: path checks, the composed settings of a command, and the
planned dataset a command after ``plan`` works on."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import UsageError

PathLike = str | os.PathLike[str]
_F = TypeVar("_F", bound=Callable[..., Any])


def paths_checked(fn: _F) -> _F:
    """Refuse a path argument no file system takes (a NUL byte, a name too long) as a
    :class:`~segpipe.errors.UsageError` naming the argument, instead of the OS's raw ValueError."""
    from ..config import check_path_text

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        for name, value in bound.arguments.items():
            values = value.values() if isinstance(value, dict) else [value]
            for v in values:
                if isinstance(v, (str, os.PathLike)) and not isinstance(v, bool):
                    text = os.fspath(v)
                    if isinstance(text, str):
                        check_path_text(text, f"{name} ")
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def composed(command: str, settings: dict[str, Any]) -> Any:
    """The composed configuration of ``command`` with ``settings`` merged in (each default lives in conf/)."""
    from ..config import settings_config

    return settings_config(command, settings)


def named(ds: Any, name: str) -> Any:
    """``ds`` under its workspace name (``dataset_name=`` may differ from the folder's name)."""
    import dataclasses

    return ds if ds.name == name else dataclasses.replace(ds, name=name)


def planned_dataset(command: str, work_dir: Any, dataset: PathLike | None) -> tuple[Any, Any, Any, Any]:
    """(workspace, its dataset entry, the plan, the dataset as planned) for a command after ``plan``.

    The dataset is loaded from the folder that was planned (its source record), never a namesake.
    """
    from ..io.datasets import load_dataset
    from ..planning import load_plan
    from ..workspace import find_dataset

    ws, dws = find_dataset(work_dir, dataset, command)
    ws.ensure_writable()
    return ws, dws, load_plan(dws.plans_path), named(load_dataset(dws.source_dataset_path()), dws.name)


def changed_since_planning(dws: Any, ds: Any) -> str | None:
    """A warning when the dataset's files are not those the plan was made from, else None."""
    from ..fingerprint import source_change

    change = source_change(dws.fingerprint_path, ds)
    if change is None:
        return None
    planned, now = change
    if planned.get("scheme", 1) != now["scheme"]:
        return (
            f"{ds.root}: {dws.name} was planned by an earlier segpipe, which recorded the dataset's files "
            f"differently, so changes since then cannot be told — run `segpipe plan {ds.root}` again to record them"
        )
    return (
        f"{ds.root}: the dataset changed since {dws.name} was planned ({planned.get('files')} files of "
        f"{planned.get('bytes')} bytes then, {now['files']} of {now['bytes']} now, or their modification "
        f"times); its plan's spacing and intensity statistics come from the earlier files — run "
        f"`segpipe plan {ds.root}` again to refresh them"
    )


def dataset_once(dataset: PathLike | None, settings: dict[str, Any]) -> PathLike | None:
    """The dataset named as a path or as ``dataset=NAME`` (popped from ``settings``), never both."""
    if dataset is not None and settings.get("dataset") is not None:
        raise UsageError("give the dataset once: as a path or as dataset=NAME, not both")
    named = settings.pop("dataset", None)
    return dataset if dataset is not None else named


def configurations(value: Any, the_plan: Any) -> list[str]:
    """The configuration names a ``config=`` value selects: None = every planned one."""
    from ..inference.model import parse_configs

    names = parse_configs(value)
    if names is None:
        return list(the_plan.configurations)
    unknown = [n for n in names if n not in the_plan.configurations]
    if unknown or not names:
        raise UsageError(
            f"configuration {', '.join(unknown) or '(none)'} is not in the plan of {the_plan.dataset}",
            hint=f"planned: {', '.join(the_plan.configurations)} (config=NAME)",
        )
    return names
