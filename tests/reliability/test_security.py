"""Reliability: what segpipe's own code may never do with what users give it (an audit of the source).

Each test is one case; its docstring's first line says the behaviour.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "segpipe"


def _calls() -> list[tuple[str, int, ast.Call, str]]:
    """(file, line, call node, dotted name of what is called) for every call in the package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                parts = []
                f = node.func
                while isinstance(f, ast.Attribute):
                    parts.append(f.attr)
                    f = f.value
                parts.append(f.id if isinstance(f, ast.Name) else "?")  # ? : called on an expression
                out.append((str(path.relative_to(PACKAGE)), node.lineno, node, ".".join(reversed(parts))))
    return out


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_no_shell_and_no_code_evaluation() -> None:
    """No shell is ever started (no os.system/os.popen, no shell=True) and no string is evaluated as code (eval/exec)."""
    found = []
    for where, line, call, name in _calls():
        if name in ("os.system", "os.popen", "eval", "exec", "compile") or name.startswith("commands."):
            found.append(f"{where}:{line} {name}")
        shell = _keyword(call, "shell")
        if name.startswith("subprocess.") and not (
            shell is None or (isinstance(shell, ast.Constant) and not shell.value)
        ):
            found.append(f"{where}:{line} {name}(shell=...)")
        if name.startswith("subprocess.") and call.args and not isinstance(call.args[0], (ast.List, ast.Tuple)):
            found.append(f"{where}:{line} {name} with a command that is not an argument list")
    assert not found, found


def test_every_checkpoint_and_model_loads_with_the_safe_unpickler() -> None:
    """Every torch.load passes weights_only=True, and nothing else unpickles (pickle.load/loads, numpy allow_pickle)."""
    found = []
    for where, line, call, name in _calls():
        if name.endswith("torch.load") or name == "load" and where.endswith("checkpoint.py"):
            flag = _keyword(call, "weights_only")
            if name.endswith("torch.load") and not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where}:{line} torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.Unpickler", "dill.load", "joblib.load"):
            found.append(f"{where}:{line} {name}")
        if name == "pickle.loads":
            found.append(f"{where}:{line} pickle.loads")
        allow = _keyword(call, "allow_pickle")
        if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
            found.append(f"{where}:{line} {name}(allow_pickle=...)")
    # parallel.py round-trips its own exceptions through pickle to check they can cross processes
    found = [f for f in found if not f.startswith("parallel.py") or "pickle.loads" not in f]
    assert not found, found


def test_configuration_is_never_instantiated_from_user_values() -> None:
    """No hydra.utils.instantiate/call and no YAML loader beyond safe_load: settings are data, never objects."""
    found = []
    for where, line, _call, name in _calls():
        if name.endswith("instantiate") or name in ("hydra.utils.call", "yaml.load", "yaml.unsafe_load"):
            found.append(f"{where}:{line} {name}")
    assert not found, found
