"""Workflows: what combines training, prediction and scoring. Folder evaluation (``segpipe
evaluate``) and ``find-best`` (the best configuration or ensemble, and its post-processing)."""
