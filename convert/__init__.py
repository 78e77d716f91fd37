"""Checkpoint import (this folder is installed as ``cheems_mlx.convert``): ``formats.py``, the
source formats and how each maps onto the native names and config (below the model: its
``sanitize`` uses it); ``checkpoint.py``, reading a source checkpoint folder into a native
model in memory (also what ``cheems_mlx.load`` uses for unconverted folders); ``convert.py``
and ``__main__.py``, writing a converted model folder: ``python -m cheems_mlx.convert``."""

from .formats import FORMATS, FormatError, detect_format, native_config, native_key, native_weights

__all__ = ["FORMATS", "FormatError", "detect_format", "native_config", "native_key", "native_weights"]
