"""Adapters on a Cheems model: ``apply_lora`` puts LoRA / DoRA layers (mlx-lm's) on named
modules, ``load_adapters`` applies a trained adapter folder (``adapter_config.json`` +
``adapters.safetensors``, as ``python -m cheems_mlx.lora`` writes it) and says clearly when
it does not fit the base model. Used by ``cheems_mlx.load(adapter_path=...)`` (loading.py),
the fine-tuning CLI (lora.py) and, through ``load``, fuse.py.
"""

import json
import sys
import types
from pathlib import Path
from typing import Dict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


class LoRAError(ValueError):
    """An adapter (or a fine-tuning setup) that cannot work; the message says why (one line)."""


def apply_lora(model, num_layers: int, params: Dict, fine_tune_type: str) -> None:
    """mlx-lm's linear_to_lora_layers with explicit keys, except that DoRA falls back
    to LoRA for quantized embeddings (mlx-lm's DoRAEmbedding cannot wrap them)."""
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear

    keys = set(params["keys"])
    use_dora = fine_tune_type == "dora"
    noted = False

    def convert(module):
        nonlocal noted
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            cls = DoRALinear if use_dora else LoRALinear
        elif isinstance(module, nn.QuantizedEmbedding):
            if use_dora and not noted:
                print("[note] DoRA does not support quantized embeddings: the expert tables "
                      "get LoRA adapters", file=sys.stderr)
                noted = True
            cls = LoRAEmbedding
        elif isinstance(module, nn.Embedding):
            cls = DoRAEmbedding if use_dora else LoRAEmbedding
        else:
            raise LoRAError(f"cannot put an adapter on a {type(module).__name__}")
        return cls.from_base(module, r=params["rank"], scale=params["scale"], dropout=params["dropout"])

    for layer in model.layers[-max(num_layers, 0):]:
        new = [(k, convert(m)) for k, m in layer.named_modules() if k in keys]
        if new:
            layer.update_modules(tree_unflatten(new))


def load_adapters(model, adapter_path) -> None:
    """Apply the adapters saved in ``adapter_path`` (adapter_config.json +
    adapters.safetensors); a base model they do not fit is a clear error."""
    path = Path(adapter_path)
    cfg_file, weights_file = path / "adapter_config.json", path / "adapters.safetensors"
    if not cfg_file.exists() or not weights_file.exists():
        raise LoRAError(f"{path} holds no adapter (adapter_config.json and adapters.safetensors)")
    cfg = types.SimpleNamespace(**json.loads(cfg_file.read_text()))
    if getattr(cfg, "num_layers", 0) > len(model.layers):
        raise LoRAError(
            f"the adapter in {path} was trained for {cfg.num_layers} layers; this model has {len(model.layers)}"
        )
    kind = getattr(cfg, "fine_tune_type", "lora")
    if kind != "full":
        params = dict(cfg.lora_parameters)
        if "keys" not in params:
            raise LoRAError(f"{cfg_file} does not list its target modules (lora_parameters.keys)")
        apply_lora(model, cfg.num_layers, params, kind)
    weights = mx.load(str(weights_file))
    model_params = dict(tree_flatten(model.parameters()))
    for name, w in weights.items():
        if name not in model_params:
            raise LoRAError(f"the adapter in {path} does not fit this model: no parameter {name!r}")
        if tuple(w.shape) != tuple(model_params[name].shape):
            raise LoRAError(
                f"the adapter in {path} does not fit this model: {name} has shape {tuple(w.shape)}, "
                f"the model expects {tuple(model_params[name].shape)}"
            )
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
