"""The checkpoint formats cheems_mlx imports, and how each maps onto the native layout.

Formats (detected from config.json and the weight names, never from the file name):

| format          | produced by                                   | tell-tale                                  |
|-----------------|-----------------------------------------------|--------------------------------------------|
| ``cheems``      | official Cheems code (HEAD)                   | ``layers.i.pre_sequence_layernorm``, ``num_cdmoe_*`` |
| ``cheems_paper``| official Cheems code at paper time (a6a4b63)  | same keys, ``num_cdmmoe_*`` / ``model_type: doge`` with ``attn_layer_period`` |
| ``doge``        | transformers ``DogeForCausalLM``              | ``model.embed_tokens``, ``input_layernorm`` |
| ``doge_legacy`` | SmallDoge remote code (older checkpoints)     | ``model.word_embed`` + ``pre_layernorm`` / ``self_attn`` |
| ``native``      | this project (``model_type: cheems`` + ``source_format``) | already native |

Native names are the official Cheems ones; see ``cheems_mlx.model``.
"""

import math
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

FORMATS = ("native", "cheems", "cheems_paper", "doge", "doge_legacy")


class FormatError(ValueError):
    """A checkpoint that cannot be imported; the message names the file / tensor."""


# per-layer renames, applied to the part after "model.layers.{i}."
_LAYER_RENAMES = [
    (r"^input_layernorm\.", "pre_sequence_layernorm."),
    (r"^pre_layernorm\.", "pre_sequence_layernorm."),
    (r"^self_attn\.", "attn."),
    (r"^input_residual$", "post_sequence_residual.weight"),
    (r"^pre_residual\.weight$", "post_sequence_residual.weight"),
    (r"^post_attention_layernorm\.", "pre_state_layernorm."),
    (r"^post_layernorm\.", "pre_state_layernorm."),
    (r"^post_attention_residual$", "post_state_residual.weight"),
    (r"^post_residual\.weight$", "post_state_residual.weight"),
    (r"^mlp\.", "feed_forward."),
]
_TOP_RENAMES = {
    "model.embed_tokens.weight": "model.word_embed.weight",
    "model.norm.weight": "model.final_layernorm.weight",
}
_DROPPED = (re.compile(r"rotary_emb\.inv_freq$"), re.compile(r"feed_forward\.router_gate\.bias$"))
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def native_key(key: str) -> Optional[str]:
    """Native name of a checkpoint tensor, or None for tensors that are dropped."""
    if key.startswith("module."):  # some trainers save with a DDP prefix
        key = key[len("module."):]
    if any(p.search(key) for p in _DROPPED):
        return None
    if key in _TOP_RENAMES:
        return _TOP_RENAMES[key]
    m = _LAYER_KEY.match(key)
    if not m:
        return key
    rest = m.group(2)
    for pattern, repl in _LAYER_RENAMES:
        new = re.sub(pattern, repl, rest)
        if new != rest:
            rest = new
            break
    rest = re.sub(r"^feed_forward\.mlp\.", "feed_forward.", rest)
    return f"model.layers.{m.group(1)}.{rest}"


def native_weights(weights: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in weights.items():
        nk = native_key(k)
        if nk is None:
            continue
        if nk in out:
            raise FormatError(f"two checkpoint tensors map to {nk!r} (one of them is {k!r})")
        out[nk] = v
    return out


# the config.json model_type each source format is written with (official Cheems code at
# HEAD: cheems; at paper time: doge; transformers and remote-code Doge: doge)
MODEL_TYPES = {"cheems": ("cheems",), "cheems_paper": ("doge", "cheems"), "doge": ("doge",),
               "doge_legacy": ("doge",)}


def detect_format(config: Dict[str, Any], keys: Iterable[str]) -> str:
    """The source format from the weight names, checked against config.json's model_type:
    a foreign config (another architecture's weights or type) is refused, not guessed."""
    fmt = _format_from_keys(config, list(keys))
    mt = config.get("model_type")
    if fmt != "native" and mt not in MODEL_TYPES[fmt]:
        supported = sorted({t for ts in MODEL_TYPES.values() for t in ts})
        raise FormatError(
            f"config.json has model_type={mt!r}, which is not a supported type ({', '.join(supported)}); "
            f"the weight names look like {fmt}, but a checkpoint of another architecture is not "
            f"converted on a guess -- fix model_type if this really is a {fmt} checkpoint"
        )
    return fmt


def _format_from_keys(config: Dict[str, Any], keys: List[str]) -> str:
    if config.get("model_type") == "cheems" and "source_format" in config:
        return "native"
    has = lambda frag: any(frag in k for k in keys)  # noqa: E731
    if has(".pre_sequence_layernorm.") or (has("model.layers.") and has(".ssd.")):
        if "num_cdmmoe_experts" in config or (
            config.get("model_type") == "doge" and "num_key_value_heads" not in config
        ):
            return "cheems_paper"
        return "cheems"
    if has("model.embed_tokens.") or has(".input_layernorm."):
        return "doge"
    if has("model.word_embed.") and (has(".pre_layernorm.") or has(".self_attn.")):
        return "doge_legacy"
    mt = config.get("model_type")
    raise FormatError(
        f"unrecognised checkpoint (model_type={mt!r}): the weight names match none of the "
        f"formats {FORMATS[1:]} -- first keys: {sorted(keys)[:5]}"
    )


def _rope(config: Dict[str, Any]) -> Tuple[float, Optional[dict]]:
    """rope_theta / rope_scaling from either the classic fields or transformers 5's
    ``rope_parameters``."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
        return float(theta), scaling
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) == "default":
        scaling = None
    return float(config.get("rope_theta", 10000.0)), scaling


_COMMON = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def native_config(config: Dict[str, Any], fmt: str, weights_shapes: Dict[str, tuple]) -> Dict[str, Any]:
    """Translate a source config to the native one. ``weights_shapes`` maps native tensor
    names to shapes (some variants are told apart by shapes: mask heads, q/k norm)."""
    if fmt == "native":
        return dict(config)
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in config]
    if missing:
        raise FormatError(f"config.json lacks required fields {missing}")
    out = {k: config[k] for k in _COMMON if config.get(k) is not None}
    if out.get("hidden_act", "silu") != "silu":
        raise FormatError(f"hidden_act {out['hidden_act']!r} is not supported (only 'silu')")
    out["model_type"] = "cheems"
    out["source_format"] = fmt
    out["rope_theta"], out["rope_scaling"] = _rope(config)
    # a checkpoint saved with tied embeddings may omit lm_head.weight; a missing field means
    # True for the Cheems configs (transformers 4 default) and False for DogeConfig
    tied_default = fmt in ("cheems", "cheems_paper") or "lm_head.weight" not in weights_shapes
    out["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", tied_default))
    H = config["num_attention_heads"]
    L = config["num_hidden_layers"]

    if fmt in ("cheems", "cheems_paper"):
        bias = bool(config.get("hidden_bias", False))
        out.update(attention_bias=bias, mlp_bias=bias, ssd_bias=bias)
        period, offset = int(config.get("attn_layer_period", 8)), int(config.get("attn_layer_offset", 7))
        out["layers_type"] = ["attn" if i % period == offset else "ssd" for i in range(L)]
        out["ssd_chunk_size"] = int(config.get("ssd_chunk_size", 256))
        out["dynamic_mask_ratio"] = float(config.get("dynamic_mask_ratio", 0.0))
        out["dynamic_mask_rule"] = "cheems_ratio" if fmt == "cheems" else "hard"
        out["dynamic_mask_heads"] = "attention"
        if fmt == "cheems_paper":
            out["num_key_value_heads"] = H  # the paper-time attention has no GQA
        out["is_moe"] = bool(config.get("is_moe", False))
        prefix = "num_cdmoe_" if fmt == "cheems" else "num_cdmmoe_"
        if f"{prefix}experts" not in config and "num_cdmoe_experts" in config:
            prefix = "num_cdmoe_"
        out["moe_router"] = "queries"
        out["moe_routing"] = "per_token"
        out["num_experts"] = int(config.get(f"{prefix}experts", 16348))
        out["num_expert_heads"] = int(config.get(f"{prefix}heads", 4))
        out["num_experts_per_tok"] = int(config.get(f"{prefix}experts_per_head", 8))
        out["expert_retrieval_size"] = int(config.get("expert_retrieval_size", 64))
    else:
        bias = config.get("attention_bias", config.get("hidden_bias", False))
        out["attention_bias"] = bool(bias)
        out["mlp_bias"] = bool(config.get("mlp_bias", config.get("hidden_bias", False)))
        out["layers_type"] = ["attn"] * L
        out["keep_window_size"] = int(config.get("keep_window_size", 2048))
        out["dynamic_mask_ratio"] = float(config.get("dynamic_mask_ratio", 0.0))
        out["sliding_window"] = config.get("sliding_window")
        a_shape = weights_shapes.get("model.layers.0.attn.A")
        Hkv = config.get("num_key_value_heads") or H
        if fmt == "doge_legacy":
            out["dynamic_mask_rule"] = "legacy_ratio"
            out["dynamic_mask_heads"] = "attention"
        else:
            out["dynamic_mask_rule"] = "keep_window"
            # transformers sizes A by Hkv; intermediate remote-code versions by H
            out["dynamic_mask_heads"] = "attention" if a_shape and a_shape[0] == H and H != Hkv else "kv"
        out["qk_norm"] = "model.layers.0.attn.q_norm.weight" in weights_shapes
        out["is_moe"] = bool(config.get("is_moe", False))
        out["moe_router"] = "router_gate"
        out["moe_routing"] = "transformers_reshape"
        out["num_experts"] = int(config.get("num_experts", 16384))
        out["num_expert_heads"] = 1
        out["num_experts_per_tok"] = int(config.get("num_experts_per_tok", 64))
        out["norm_topk_prob"] = bool(config.get("norm_topk_prob", False))
    if out["is_moe"]:
        K = math.isqrt(out["num_experts"])
        if K < 1:
            raise FormatError(f"num_experts {out['num_experts']} is too small")
    return out


def is_native(config: Dict[str, Any]) -> bool:
    """A folder written by this project (converter, trainer, fuse)."""
    return config.get("model_type") == "cheems" and "source_format" in config
