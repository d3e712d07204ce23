#!/usr/bin/env python
"""The README's reliability table, generated from the reliability suite's own list.

Every case of ``tests/reliability/`` becomes a row: the parametrized bad datasets of
``test_bad_datasets.BAD_DATASETS`` (name and behaviour), and every other test by its name and
the first paragraph of its docstring. ``--write`` replaces the table between the README's markers;
without it the table is printed. ``tests/reliability/test_table.py`` fails when the README's
table differs from what this generates.

    python tools/reliability_table.py --write
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "tests" / "reliability"
README = REPO / "README.md"
START, END = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"


def _doc_rows(path: Path) -> list[tuple[str, str]]:
    """(test name, first docstring paragraph) of each test function of a suite file, in file order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rows = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            doc = ast.get_docstring(node)
            if doc:  # a parametrized test lists its cases itself
                first = doc.strip().split("\n\n")[0]  # the first paragraph, on one line
                rows.append((node.name[len("test_") :], " ".join(line.strip() for line in first.splitlines())))
    return rows


def _bad_datasets() -> list[tuple[str, str]]:
    spec = importlib.util.spec_from_file_location("reliability_bad_datasets", SUITE / "test_bad_datasets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return [(b.name, f"`check` and `plan`: {b.behaviour}; no fingerprint or plan written") for b in module.BAD_DATASETS]


def table() -> str:
    """The Markdown table of every case of the suite."""
    rows: list[tuple[str, str, str]] = [("bad dataset", n, b) for n, b in _bad_datasets()]
    for path in sorted(SUITE.glob("test_*.py")):
        if path.name in ("test_bad_datasets.py", "test_table.py"):
            continue
        group = path.stem[len("test_") :].replace("_", " ")
        rows += [(group, n, b) for n, b in _doc_rows(path)]
    lines = ["| area | case | behaviour |", "| --- | --- | --- |"]
    lines += [f"| {g} | `{n}` | {b} |" for g, n, b in rows]
    return "\n".join(lines)


def readme_table(text: str) -> str:
    """The table between the README's markers."""
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the README's table")
    a = ap.parse_args()
    generated = table()
    if not a.write:
        print(generated)
        return 0
    text = README.read_text(encoding="utf-8")
    start, end = text.index(START) + len(START), text.index(END)
    README.write_text(text[:start] + "\n" + generated + "\n" + text[end:], encoding="utf-8")
    print(f"{README}: {generated.count(chr(10)) - 1} case(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
