"""Checkpoint import: ``python -m cheems_mlx.convert`` (this folder is installed as
``cheems_mlx.convert``)."""

from .formats import FORMATS, FormatError, detect_format, native_config, native_key, native_weights

__all__ = ["FORMATS", "FormatError", "detect_format", "native_config", "native_key", "native_weights"]
