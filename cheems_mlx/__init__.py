"""cheems_mlx: the Wonderful Matrices (Cheems) and Doge language models in MLX."""

__version__ = "0.1.0"

# before anything imports mlx.core: put a fast CBLAS in front of the mlx[cpu] wheel's reference one
from . import blas as _blas  # noqa: E402

_blas.select()

from .model import Model, ModelArgs  # noqa: E402

__all__ = ["Model", "ModelArgs", "load", "__version__"]


def load(path_or_repo=None, **kwargs):
    """Load a converted model and its tokenizer: ``(model, tokenizer)``. See
    ``cheems_mlx.loading.load``."""
    from .loading import load as _load

    return _load(path_or_repo, **kwargs)
