"""Readers, writers and dataset discovery."""

from .image import IMAGE_EXTENSIONS, ImageHeader, atomic_path, read_header, read_image, write_image

__all__ = ["IMAGE_EXTENSIONS", "ImageHeader", "atomic_path", "read_header", "read_image", "write_image"]
