"""The package's shape and its settings: no module over 600 lines or function over 100 lines, no
import circle, no import of the package root or of a private name from another module, every
settings record built from ``conf/``, no default that ``conf/`` holds written again in a
function's signature, and a ``conf/`` default edited reaching the command line and the Python API
alike."""

from __future__ import annotations

import ast
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import structure_report  # noqa: E402

from segpipe.settings import conf as settings_conf  # noqa: E402

#: parameters named like a setting of conf/ whose default means something else there, and why
SAME_NAME_OTHER_MEANING = {
    # a plan configuration's context (0: a 3-D or plain 2-D network), not the planner's 2.5-D choice
    "context_slices": "a plan configuration's neighbouring slices, not the planner setting",
}


@pytest.fixture(scope="module")
def shape() -> dict:
    return structure_report.report()


def test_no_import_circles_root_imports_or_private_imports(shape: dict) -> None:
    assert shape["circles"] == []
    assert shape["package_root_imports"] == []
    assert shape["private_imports"] == []
    assert shape["upward_imports"] == []  # through the layers of pyproject.toml's import contract


def test_no_function_takes_more_than_five_positional_parameters(shape: dict) -> None:
    assert shape["functions_over_5_positional"] == []


def test_no_module_over_600_lines_and_no_function_over_100(shape: dict) -> None:
    """A module that outgrows 600 lines is split by responsibility, a function over 100 lines into named steps."""
    assert shape["modules_over_600"] == []
    assert shape["functions_over_100_lines"] == []


def _conf_leaves() -> dict[str, set[str]]:
    """Every setting's name in conf/ → the reprs of its defaults there (any group, any option)."""
    from omegaconf import OmegaConf

    leaves: dict[str, set[str]] = {}

    def walk(node: dict) -> None:
        for key, value in node.items():
            if key == "defaults":
                continue
            if isinstance(value, dict):
                walk(value)
            else:
                leaves.setdefault(str(key), set()).add(repr(value))

    for path in sorted((REPO / "conf").rglob("*.yaml")):
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        assert isinstance(data, dict)
        walk(data)
    return leaves


def test_no_signature_repeats_a_default_of_conf() -> None:
    """A parameter named after a setting takes None for "the configured default" instead of writing
    the value of conf/ again (where an edit of conf/ would not reach it)."""
    leaves = _conf_leaves()
    repeated = []
    for path in sorted((REPO / "segpipe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = list(zip(positional[len(positional) - len(a.defaults) :], a.defaults))
            pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg in SAME_NAME_OTHER_MEANING or arg.arg not in leaves:
                    continue
                if isinstance(default, ast.Constant) and default.value is not None:
                    if repr(default.value) in leaves[arg.arg]:
                        repeated.append(
                            f"{path.relative_to(REPO)}:{node.lineno} {node.name}({arg.arg}={default.value!r})"
                        )
    assert repeated == []


def test_every_settings_record_is_built_from_the_composed_configuration() -> None:
    from segpipe.config import compose_config, to_container
    from segpipe.planning import PlanSettings
    from segpipe.settings import DicomOptions, InferSettings
    from segpipe.training.run_settings import train_settings

    cfg = to_container(compose_config(["overlap=0.25", "allow_few_slices=true", "epochs=7", "gpu_memory_gb=12"]))
    assert InferSettings.from_conf(cfg["infer"]).overlap == 0.25
    assert InferSettings.from_conf().overlap == 0.5
    assert DicomOptions.from_conf(cfg["dicom"]).allow_few_slices is True
    assert DicomOptions.from_conf().allow_few_slices is False
    assert PlanSettings.from_mapping(cfg["planner"]).gpu_memory_gb == 12
    assert train_settings({"epochs": cfg["train"]["epochs"]})["epochs"] == 7
    # a keyword given as None keeps what is below it
    assert InferSettings.from_conf(cfg["infer"], overlap=None, tta=False).overlap == 0.25


@pytest.fixture
def edited_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of conf/ that the settings read instead of the installed one (caches cleared)."""
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    caches = [
        settings_conf.group_defaults,
        settings_conf.option_defaults,
        settings_conf.composed_defaults,
        settings_conf.selectable_groups,
        settings_conf.setting_comments,
    ]
    for c in caches:
        c.cache_clear()
    monkeypatch.setattr(settings_conf, "config_dir", lambda: conf)
    try:
        yield conf
    finally:
        monkeypatch.undo()
        for c in caches:
            c.cache_clear()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_an_edited_default_reaches_the_command_line_and_the_python_api(edited_conf: Path) -> None:
    from segpipe.config import compose_config, settings_help
    from segpipe.inference import window_starts
    from segpipe.settings import DicomOptions
    from segpipe.training.optim import optim_defaults
    from segpipe.training.run_settings import train_settings

    _edit(edited_conf / "infer" / "default.yaml", "overlap: 0.5 ", "overlap: 0.25")
    _edit(edited_conf / "train" / "default.yaml", "epochs: 1000 ", "epochs: 300  ")
    _edit(edited_conf / "dicom" / "default.yaml", "spacing_tolerance: 0.02", "spacing_tolerance: 0.05")
    _edit(edited_conf / "optim" / "sgd.yaml", "momentum: 0.99", "momentum: 0.95")
    # the command line
    assert compose_config([], command="infer").infer.overlap == 0.25
    assert "overlap=0.25" in settings_help("infer")
    assert compose_config([], command="train").train.epochs == 300
    # the Python API, down to the functions that take the setting
    assert window_starts([110], [64]) == [[0, 46]]  # overlap 0.5 gives [0, 23, 46]
    assert train_settings()["epochs"] == 300
    assert DicomOptions.from_conf().spacing_tolerance == 0.05
    assert optim_defaults()["momentum"] == 0.95


def test_each_group_names_the_same_settings_in_conf_its_schema_and_its_record() -> None:
    """A setting is written in ``conf/`` (value and comment), typed once in the schema of
    ``segpipe.config`` and, where a record takes the group, a field of that record: the three lists
    of names agree, so a setting added to one and not the others fails here, not at a user's run."""
    import dataclasses

    from segpipe import config
    from segpipe.planning import PlanSettings
    from segpipe.settings import DicomOptions, InferSettings, group_defaults
    from segpipe.training.run_settings import default_settings

    def names(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    assert names(config.DicomSchema) == set(group_defaults("dicom")) == names(DicomOptions)
    assert names(config.InferSchema) == set(group_defaults("infer")) == names(InferSettings)
    assert names(config.EvaluateSchema) == set(group_defaults("evaluate"))
    assert names(config.TrainSchema) == set(group_defaults("train"))
    assert set(group_defaults("train")) - {"fold"} <= set(default_settings())
    assert set(group_defaults("planner")) == set(PlanSettings.fields())
