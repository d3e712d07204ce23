"""Reliability: what segpipe's own code may never do with what users give it (an audit of the
source), and model folders that try to make it (crafted pickles, paths leaving the folder).

Each test is one case; its docstring's first line says the behaviour.
"""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

from segpipe import cli

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


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a crafted weight file would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def _infer_error(capsys: pytest.CaptureFixture[str], model: Path, image: Path, out: Path) -> tuple[int, str]:
    code = cli.main(["infer", str(image), "-o", str(out), "-m", str(model)])
    return code, capsys.readouterr().err


def test_a_crafted_pickle_in_a_model_folder_is_refused_not_run(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model folder whose weight file holds pickled code is refused (its checksum, then the safe unpickler); the code never runs."""
    source, image = tiny_model
    model = tmp_path / "model"
    shutil.copytree(source, model)
    info = json.loads((model / "model.json").read_text())
    weights = model / info["members"][0]["file"]
    marker = tmp_path / "pwned"
    with open(weights, "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f)
    code, err = _infer_error(capsys, model, image, tmp_path / "out1")
    assert code == 4 and "checksum differs" in err and "Traceback" not in err, err
    # the description edited to match: the file is still never unpickled beyond tensors and plain values
    info["members"][0]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (model / "model.json").write_text(json.dumps(info))
    code, err = _infer_error(capsys, model, image, tmp_path / "out2")
    assert code == 4 and "could run code" in err and "Traceback" not in err, err
    assert not marker.exists()
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("how", ["dot_dot", "absolute", "link"])
def test_a_model_folder_pointing_outside_itself_is_refused(
    how: str, tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model.json weight path with `../`, an absolute path, or a weight file linking outside the model folder is refused."""
    source, image = tiny_model
    model = tmp_path / "model"
    shutil.copytree(source, model)
    info = json.loads((model / "model.json").read_text())
    weights = model / info["members"][0]["file"]
    outside = tmp_path / "elsewhere.pt"
    shutil.copy(weights, outside)
    if how == "dot_dot":
        info["members"][0]["file"] = "../elsewhere.pt"
    elif how == "absolute":
        info["members"][0]["file"] = str(outside)
    else:
        weights.unlink()
        weights.symlink_to(outside)
    (model / "model.json").write_text(json.dumps(info))
    code, err = _infer_error(capsys, model, image, tmp_path / "out")
    assert code == 4 and "model folder" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
