"""Settings: the one reader of ``conf/`` (:mod:`segpipe.settings.conf`) and the typed records built
from it (:mod:`segpipe.settings.records`). Nothing here knows the
commands; the command line's composition with per-command checks lives in :mod:`segpipe.config`."""

from .conf import (
    all_settings,
    composed_defaults,
    config_dir,
    configured,
    default_option,
    group_defaults,
    option_defaults,
    process_settings,
    selectable_groups,
    setting_comments,
    setting_default,
)
from .records import DicomOptions, InferSettings

__all__ = [
    "DicomOptions",
    "InferSettings",
    "all_settings",
    "composed_defaults",
    "config_dir",
    "configured",
    "default_option",
    "group_defaults",
    "option_defaults",
    "process_settings",
    "selectable_groups",
    "setting_comments",
    "setting_default",
]
