"""Plain-text output of the command line: tables that fit the terminal, DICOM series rows, and the
composed configuration as commented YAML."""

from __future__ import annotations

import shutil
import sys
from typing import Any


def _term_width() -> int | None:
    return shutil.get_terminal_size((0, 0)).columns or None if sys.stdout.isatty() else None


def table(rows: list[dict[str, Any]], columns: list[str] | None = None, *, width: int | None = None) -> str:
    """A plain-text table; on a terminal the widest columns are shortened (with …) to fit ``width``."""
    if not rows:
        return ""
    cols = columns or list(rows[0])
    cells = [[cell(r.get(c)) for c in cols] for r in rows]
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


def cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "×".join(cell(x) for x in v) if all(isinstance(x, (int, float)) for x in v) else ",".join(map(cell, v))
    return "" if v is None else str(v)


def series_rows(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from ..io.dicom import unique_suffixes

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


def commented_yaml(text: str) -> str:
    """The composed YAML with each setting's comment from conf/ beside it, so that two settings of
    one name in different groups (``train.batch_size``, ``infer.batch_size``) say what each is."""
    import re

    from ..settings import setting_comments

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
