"""Readers, writers and dataset discovery."""

from .atomic import atomic_folder, atomic_path, save_npy, write_text
from .image import IMAGE_EXTENSIONS, ImageHeader, read_header, read_image, write_image

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
