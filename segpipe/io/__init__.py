"""Readers, writers and dataset discovery."""

from .atomic import atomic_folder, atomic_path, save_npy, write_text
from .formats import IMAGE_EXTENSIONS
from .image import ImageHeader, read_header, read_image, write_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageHeader",
    "atomic_folder",
    "atomic_path",
    "read_header",
    "read_image",
    "save_npy",
    "write_image",
    "write_text",
]
