"""Print figures about the shape of the segpipe package, read from its source alone.

    python tools/structure_report.py [--json FILE]

Module sizes (lines per file, median and max), functions over 100 lines, functions with more
than 5 positional parameters, import circles between modules, imports of the package root,
imports of a private name (``from segpipe.x import _name``) across modules, and imports that run
upward through the layers of the import contract in ``pyproject.toml`` (``[tool.importlinter]``,
the contract named "layers"). Nothing is imported: the figures come from parsing each file, so
the report runs in a second and gives the same answer on any machine.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "segpipe"


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / PACKAGE).rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, Path]) -> dict[str, list[tuple[str, str | None, int]]]:
    """module → [(imported module, imported name or None, line)] within the package."""
    out: dict[str, list[tuple[str, str | None, int]]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        found: list[tuple[str, str | None, int]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        found.append((alias.name, None, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_pkg, node)
                if target.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:
                        found.append((sub, None, node.lineno))
                    else:
                        found.append((target, alias.name, node.lineno))
        out[mod] = found
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    result.append(sorted(comp))
    return result


def layers() -> list[list[str]]:
    """The layers contract of pyproject.toml, highest layer first, each a list of modules."""
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())
    for contract in conf.get("tool", {}).get("importlinter", {}).get("contracts", []):
        if contract.get("type") == "layers":
            return [[m.strip().strip("()") for m in re.split(r"[|:]", layer)] for layer in contract["layers"]]
    return []


def layer_of(mod: str, stack: list[list[str]]) -> int | None:
    best: tuple[int, int] | None = None
    for depth, layer in enumerate(stack):
        for name in layer:
            if mod == name or mod.startswith(name + "."):
                if best is None or len(name) > best[1]:
                    best = (depth, len(name))
    return None if best is None else best[0]


def functions(mods: dict[str, Path]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    long_: list[tuple[str, int]] = []
    positional: list[tuple[str, int]] = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{mod}.{node.name}:{node.lineno}"
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 100:
                    long_.append((name, length))
                args = [a.arg for a in node.args.posonlyargs + node.args.args]
                args = [a for a in args if a not in ("self", "cls")]
                if len(args) > 5:
                    positional.append((name, len(args)))
    return sorted(long_, key=lambda t: -t[1]), sorted(positional, key=lambda t: -t[1])


def report() -> dict:
    mods = modules()
    sizes = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    imp = imports(mods)
    graph = {m: {t for t, _, _ in imp[m] if t in mods and t != m} for m in mods}
    stack = layers()
    upward = []
    for m, found in imp.items():
        lm = layer_of(m, stack)
        for t, _, line in found:
            lt = layer_of(t, stack)
            if lm is not None and lt is not None and lt < lm:
                upward.append(f"{m}:{line} -> {t}")
    root = sorted({f"{m}:{line}" for m, f in imp.items() for t, _, line in f if t == PACKAGE and m != PACKAGE})
    private = sorted(
        {
            f"{m}:{line} {t}.{name}"
            for m, f in imp.items()
            for t, name, line in f
            if name and name.startswith("_") and not name.startswith("__") and t != m
        }
    )
    long_, positional = functions(mods)
    values = sorted(sizes.values())
    return {
        "modules": len(sizes),
        "lines_total": sum(values),
        "lines_median": statistics.median(values),
        "lines_max": max(values),
        "modules_over_600": sorted((m, n) for m, n in sizes.items() if n > 600),
        "modules_over_400": sorted((m, n) for m, n in sizes.items() if n > 400),
        "functions_over_100_lines": long_,
        "functions_over_5_positional": positional,
        "circles": circles(graph),
        "package_root_imports": root,
        "private_imports": private,
        "upward_imports": sorted(set(upward)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every finding, not only counts")
    args = ap.parse_args(argv)
    rep = report()
    for key, value in rep.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            if args.verbose:
                for item in value:
                    print(f"    {item}")
        else:
            print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
