"""segpipe's version, and the versions of what a run's record names (imports nothing of segpipe)."""

from __future__ import annotations

__version__ = "0.1.0"


def versions(*, lightning: bool = False) -> dict[str, str]:
    """``{"segpipe": …, "torch": …}`` (and ``"lightning"`` when asked): what a model or run record keeps."""
    out = {"segpipe": __version__}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if lightning:
        import lightning as L

        out["lightning"] = L.__version__
    return out
