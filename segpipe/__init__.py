"""segpipe: self-configuring segmentation of 3D medical images.

Public API (each CLI command wraps one function; settings are the command's key=value
settings as keyword arguments, defaults from ``conf/``)::

    segpipe.info(path)              segpipe.check(dataset)        segpipe.plan(dataset, ...)
    segpipe.preprocess(dataset)     segpipe.demo()                segpipe.generate_demo_data(out)
    segpipe.read_image(path)        segpipe.write_image(path, array, geometry)
    segpipe.load_dataset(path)      segpipe.Geometry              segpipe.SegpipeError
    segpipe.train(fold=0, ...)      segpipe.infer(input, ...)     segpipe.export(output=...)
    segpipe.Predictor.from_model(folder).predict(image)   (segment one case in Python)
    segpipe.restore(prediction, properties)   (undo preprocessing: back to the case's own geometry)

No public function shares its name with a submodule (the preprocessing code lives in
``segpipe.preprocessing``, so ``segpipe.preprocess`` stays the function).
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .api import (  # noqa: E402
    check,
    demo,
    evaluate,
    export,
    find_best,
    generate_demo_data,
    infer,
    info,
    plan,
    preprocess,
    train,
)
from .errors import (  # noqa: E402
    ConfigError,
    DataError,
    DatasetError,
    DicomError,
    NotAvailableError,
    ReadError,
    SegpipeError,
    StateError,
    UsageError,
)
from .geometry import Geometry  # noqa: E402
from .io.datasets import Case, Dataset, load_dataset, read_case  # noqa: E402
from .io.image import read_image, write_image  # noqa: E402
from .workspace import DatasetWorkspace, Workspace  # noqa: E402


def restore(prediction: Any, properties: dict[str, Any], *, is_label: bool | None = None) -> Any:
    """Undo preprocessing (see :func:`segpipe.preprocessing.restore`): back to the case's own grid."""
    from .preprocessing import restore as _restore

    return _restore(prediction, properties, is_label=is_label)


_LAZY = ("Prediction", "Predictor")  # need torch: imported on first use, so `import segpipe` stays light


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'segpipe' has no attribute {name!r}")


__all__ = [
    "Case",
    "ConfigError",
    "DataError",
    "Dataset",
    "DatasetError",
    "DatasetWorkspace",
    "DicomError",
    "Geometry",
    "NotAvailableError",
    "Prediction",  # noqa: F822 - provided on first use by __getattr__
    "Predictor",  # noqa: F822 - provided on first use by __getattr__
    "ReadError",
    "SegpipeError",
    "StateError",
    "UsageError",
    "Workspace",
    "__version__",
    "check",
    "demo",
    "evaluate",
    "export",
    "find_best",
    "generate_demo_data",
    "infer",
    "info",
    "load_dataset",
    "plan",
    "preprocess",
    "read_case",
    "read_image",
    "restore",
    "train",
    "write_image",
]
