"""Canonical JSON: the one writer and reader of segpipe's JSON artefacts.

Every JSON file segpipe writes (``fingerprint.json``, ``plans.json``, cache sidecars, splits,
source records) goes through :func:`dumps` so the same data always gives the same bytes:
sorted keys, one-space indent, a trailing newline, and no ``NaN``/``Infinity`` (which other
JSON readers refuse). :func:`write_json` writes atomically (:mod:`segpipe.io.atomic`);
:func:`read_json` turns a missing or corrupt file into one clear :class:`~segpipe.errors.SegpipeError`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SegpipeError, StateError
from .atomic import write_text

__all__ = ["dumps", "read_json", "write_json"]


def _default(value: Any) -> Any:
    """numpy scalars and arrays, paths and sets as plain JSON values (everything else is refused)."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _nonfinite_at(data: Any, where: str = "") -> str | None:
    """Where the first NaN/Infinity sits in ``data`` (e.g. ``['cases'][3]['mean']``), or None."""
    if isinstance(data, (float, np.floating)):
        return None if math.isfinite(float(data)) else where or "(top level)"
    if isinstance(data, np.ndarray) and np.issubdtype(data.dtype, np.floating):
        bad = np.argwhere(~np.isfinite(data))
        return f"{where}[{', '.join(map(str, bad[0]))}]" if len(bad) else None
    if isinstance(data, Mapping):
        for k, v in data.items():
            found = _nonfinite_at(v, f"{where}[{k!r}]")
            if found:
                return found
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            found = _nonfinite_at(v, f"{where}[{i}]")
            if found:
                return found
    return None


def dumps(data: Any, *, compact: bool = False) -> str:
    """Canonical JSON text of ``data``: sorted keys, indent 1, trailing newline; same data, same bytes.

    ``compact=True`` drops the indentation (one line): for large machine-read records such as
    cache properties, where the indenting encoder (pure Python) costs ~20 ms per case and the
    compact one runs in C. NaN and Infinity are refused (``ValueError`` naming where the value
    sits): strict JSON has no such numbers, and a NaN in a plan or fingerprint is a bug upstream.
    """
    layout: dict[str, Any] = {"separators": (",", ":")} if compact else {"indent": 1}
    try:
        return json.dumps(data, sort_keys=True, allow_nan=False, default=_default, **layout) + "\n"
    except ValueError:
        where = _nonfinite_at(data)
        if where is None:
            raise
        raise ValueError(f"cannot write a non-finite number as JSON (at {where})") from None


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write :func:`dumps` of ``data`` to ``path`` atomically (temp file beside it, then rename).

    ``data`` is serialised before anything touches the disk, so a refused value leaves the
    previous file (if any) untouched.
    """
    return write_text(path, dumps(data))


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def read_json(
    path: str | os.PathLike[str],
    *,
    what: str,
    hint: str,
    error: type[SegpipeError] = StateError,
    expect: type | None = dict,
) -> Any:
    """Parse the JSON file at ``path``; a missing, unreadable or corrupt file raises ``error``.

    ``what`` names the artefact for the message (``"plan"``, ``"fingerprint"``), ``hint`` says
    how to get a good one (``"run `segpipe plan DATASET` first"``). ``error`` is
    :class:`~segpipe.errors.StateError` for workspace artefacts (exit 4) and
    :class:`~segpipe.errors.ReadError` for files the user supplies (exit 3). ``expect`` (default
    ``dict``) is the type the top level must have; None accepts any JSON value.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{p}: no {what} (file not found)", hint=hint) from None
    except IsADirectoryError:
        raise error(f"{p}: is a folder, not a {what} file", hint=hint) from None
    except UnicodeDecodeError:
        raise error(f"{p}: unreadable {what} (not UTF-8 text)", hint=hint) from None
    except OSError as exc:
        raise error(f"{p}: cannot read the {what} ({exc.strerror or type(exc).__name__})", hint=hint) from None
    if not text.strip():
        raise error(f"{p}: empty {what} file", hint=hint)
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise error(f"{p}: corrupt {what} (invalid JSON at line {exc.lineno}: {exc.msg})", hint=hint) from None
    except _NonFinite as exc:
        raise error(f"{p}: corrupt {what} (holds {exc.args[0]}, which strict JSON does not allow)", hint=hint) from None
    if expect is not None and not isinstance(data, expect):
        raise error(f"{p}: corrupt {what} (a JSON {type(data).__name__}, expected a {expect.__name__})", hint=hint)
    return data
