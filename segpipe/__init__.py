"""segpipe: self-configuring segmentation of 3D medical images.

Public API (each CLI command wraps one function)::

    segpipe.info(path)              segpipe.check(dataset)        segpipe.plan(dataset, ...)
    segpipe.read_image(path)        segpipe.write_image(path, array, geometry)
    segpipe.load_dataset(path)      segpipe.Geometry              segpipe.SegpipeError
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import check, demo, generate_demo_data, info, plan, preprocess  # noqa: E402
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

__all__ = [
    "Case", "ConfigError", "DataError", "Dataset", "DatasetError", "DicomError", "Geometry", "NotAvailableError",
    "ReadError", "SegpipeError", "StateError", "UsageError", "__version__", "check", "demo", "generate_demo_data",
    "info", "load_dataset", "plan", "preprocess", "read_case", "read_image", "write_image",
]
