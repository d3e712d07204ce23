"""The public Python API: one function per command, plain arguments in, plain results out.

Each CLI command is a thin wrapper over a function here; pipelines call these directly::

    import segpipe
    report = segpipe.check("data/Task04_Hippocampus")
    if report.ok:
        result = segpipe.plan("data/Task04_Hippocampus", work_dir="work", gpu_memory_gb=24)

Errors are raised as :class:`segpipe.SegpipeError` subclasses (see :mod:`segpipe.errors`).

The functions live by stage: ``data`` (info, check, plan, preprocess), ``training`` (train),
``prediction`` (infer, export, evaluate, find_best) and ``demo``; ``common`` holds what they share.
"""

from __future__ import annotations

from ..io.formats import image_extension
from .data import check, info, plan, preprocess
from .demo import demo, generate_demo_data
from .prediction import evaluate, export, find_best, infer
from .training import train

__all__ = [
    "check",
    "demo",
    "evaluate",
    "export",
    "find_best",
    "generate_demo_data",
    "image_extension",
    "infer",
    "info",
    "plan",
    "preprocess",
    "train",
]
