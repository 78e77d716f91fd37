# mlx-lm imports this file when run with --trust-remote-code (config.json "model_file").
from cheems_mlx.model import Model, ModelArgs  # noqa: F401
