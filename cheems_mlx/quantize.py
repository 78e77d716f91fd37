"""Weight quantization of cheems_mlx models, on top of mlx-lm's own tools.

    model, config, report = quantize(model, config, bits=4, group_size=64, mode="affine",
                                     recipe=None)
    model, config = dequantize(model, config)

``quantize`` checks the settings (the bit widths, modes and group sizes mlx accepts),
combines ``Model.quant_predicate`` (what the model keeps in higher precision) with an
optional mlx-lm mixed-bit recipe (``mixed_2_6`` ...), plans which layers will be
quantized, and then calls mlx-lm's ``quantize_model``, which rewrites ``nn.Linear`` into
``QuantizedLinear`` and ``nn.Embedding`` (the word embedding and the CDMoE expert tables)
into ``QuantizedEmbedding`` and records the settings in ``config["quantization"]``, from
which mlx-lm's ``load_model`` re-creates the same modules. ``dequantize`` is mlx-lm's
``dequantize_model`` plus the config clean-up.

Every expected failure raises :class:`QuantizeError` (a ``ValueError``) with a one-line
message. Layers whose input dimension is not a multiple of the group size cannot be
quantized and stay in floating point; the report names them, and a model in which no
layer at all could be quantized is an error.
"""

import contextlib
import io
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import mlx.nn as nn
from mlx.utils import tree_flatten

MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
# the floating-point modes allow exactly one (bits, group size) pair each
FIXED_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
AFFINE_DEFAULTS = (4, 64)


def recipes() -> Tuple[str, ...]:
    from mlx_lm.convert import QUANT_RECIPES

    return tuple(QUANT_RECIPES)


class QuantizeError(ValueError):
    """Bad quantization settings or input; the message is one line."""


def _fail(msg: str) -> QuantizeError:
    return QuantizeError(" ".join(str(msg).split()))


def resolve_settings(
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    mode: Optional[str] = None,
    recipe: Optional[str] = None,
) -> Tuple[int, int, str]:
    """Validate and complete (bits, group_size, mode); ``None`` means the mode's default
    (affine: 4 bits, group 64; mxfp4 / nvfp4 / mxfp8: their only valid pair)."""
    mode = mode or "affine"
    if mode not in MODES:
        raise _fail(f"unsupported quantization mode {mode!r}; expected one of {', '.join(MODES)}")
    for name, v in (("bits", bits), ("group size", group_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise _fail(f"quantization {name} must be an integer, got {v!r}")
    if recipe is not None:
        if recipe not in recipes():
            raise _fail(f"unknown quantization recipe {recipe!r}; expected one of {', '.join(recipes())}")
        if mode != "affine":
            raise _fail(f"the mixed-bit recipe {recipe} is affine only; it cannot be combined with mode {mode}")
        if bits is not None:
            raise _fail(f"the recipe {recipe} chooses the bits of every layer itself; drop the bits setting")
    if mode == "affine":
        bits = AFFINE_DEFAULTS[0] if bits is None else bits
        group_size = AFFINE_DEFAULTS[1] if group_size is None else group_size
        if bits not in AFFINE_BITS:
            raise _fail(
                f"unsupported quantization bits {bits} for mode affine; "
                f"expected one of {', '.join(map(str, AFFINE_BITS))}"
            )
        if group_size not in AFFINE_GROUP_SIZES:
            raise _fail(
                f"unsupported quantization group size {group_size} for mode affine; "
                f"expected one of {', '.join(map(str, AFFINE_GROUP_SIZES))}"
            )
        return bits, group_size, mode
    fb, fg = FIXED_MODES[mode]
    if bits is not None and bits != fb:
        raise _fail(f"quantization mode {mode} has {fb} bits per weight; got bits {bits}")
    if group_size is not None and group_size != fg:
        raise _fail(f"quantization mode {mode} needs group size {fg}; got group size {group_size}")
    return fb, fg, mode


def describe(q: Optional[dict]) -> str:
    """'4-bit affine, group 64 (+3 per-layer settings)' for a config's quantization entry."""
    if not q:
        return "not quantized"
    per_layer = sum(1 for v in q.values() if isinstance(v, dict))
    s = f"{q.get('bits')}-bit {q.get('mode', 'affine')}, group {q.get('group_size')}"
    if per_layer:
        s += f" (+{per_layer} per-layer setting{'s' if per_layer > 1 else ''})"
    return s


def quantizable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, module) of every leaf module nn.quantize can convert (Linear, Embedding)."""
    return [
        (p, m)
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if hasattr(m, "to_quantized")
    ]


def build_predicate(
    model: nn.Module, group_size: int, recipe: Optional[str] = None
) -> Callable[[str, nn.Module], Union[bool, dict]]:
    """``Model.quant_predicate`` combined with an mlx-lm mixed-bit recipe: the recipe
    chooses the bits of every layer the model lets it quantize; a layer the model keeps
    in floating point (False) or at its own setting (a dict) keeps that."""
    own = getattr(model, "quant_predicate", None) or (lambda p, m: True)
    if recipe is None:
        return own
    from mlx_lm.convert import mixed_quant_predicate_builder

    try:
        mixed = mixed_quant_predicate_builder(recipe, model, group_size)
    except ValueError as e:
        raise _fail(f"recipe {recipe}: {e}") from None

    def predicate(path: str, module: nn.Module):
        choice = own(path, module)
        if choice is False or isinstance(choice, dict):
            return choice
        return mixed(path, module)

    return predicate


@dataclass
class QuantReport:
    bits: int
    group_size: int
    mode: str
    recipe: Optional[str] = None
    quantized: Dict[str, Tuple[int, int, str]] = field(default_factory=dict)  # path -> (bits, group, mode)
    protected: List[str] = field(default_factory=list)  # kept in float by the model's predicate
    held: List[str] = field(default_factory=list)  # the model's predicate chose their setting (8 bits)
    indivisible: List[str] = field(default_factory=list)  # last dim not a multiple of the group size
    bits_per_weight: float = 0.0

    def _names(self, paths: List[str], limit: int = 4) -> str:
        shown = ", ".join(paths[:limit])
        return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")

    def lines(self) -> List[str]:
        total = len(self.quantized) + len(self.protected) + len(self.indivisible)
        what = self.recipe or f"{self.bits}-bit {self.mode}"
        counts: Dict[int, int] = {}
        for b, _, _ in self.quantized.values():
            counts[b] = counts.get(b, 0) + 1
        mix = ", ".join(f"{n} at {b} bits" for b, n in sorted(counts.items()))
        out = [
            f"quantized: {what}, group {self.group_size}: {len(self.quantized)} of {total} layers "
            f"({mix}), {self.bits_per_weight:.2f} bits per weight"
        ]
        kinds = lambda paths: ", ".join(sorted({p.rsplit(".", 1)[-1] for p in paths}))  # noqa: E731
        if self.held:
            held_bits = "/".join(str(b) for b in sorted({self.quantized[p][0] for p in self.held}))
            out.append(f"kept at {held_bits} bits by the model's predicate: {len(self.held)} ({kinds(self.held)})")
        if self.protected:
            out.append(
                f"kept in floating point by the model's predicate: {len(self.protected)} ({kinds(self.protected)})"
            )
        return out

    def indivisible_note(self) -> Optional[str]:
        if not self.indivisible:
            return None
        return (
            f"note: {len(self.indivisible)} layer{'s' if len(self.indivisible) > 1 else ''} left "
            f"unquantized because the last dimension is not a multiple of the group size "
            f"{self.group_size}: {self._names(self.indivisible)}"
        )


def plan(model: nn.Module, predicate, bits: int, group_size: int, mode: str, recipe=None) -> QuantReport:
    """What ``quantize_model`` will do with this predicate (same rules: a layer is
    quantized when its last dimension is a multiple of the group size and the predicate
    says so). Layers the predicate keeps in floating point count as protected whatever
    their shape."""
    report = QuantReport(bits, group_size, mode, recipe)
    own = getattr(model, "quant_predicate", None)
    dims = set()
    for path, module in quantizable_layers(model):
        choice = predicate(path, module)
        if choice is False or choice is None:
            report.protected.append(path)
        elif module.weight.shape[-1] % group_size:
            report.indivisible.append(path)
            dims.add(int(module.weight.shape[-1]))
        elif isinstance(choice, dict):
            if own is not None and isinstance(own(path, module), dict):
                report.held.append(path)
            report.quantized[path] = (
                choice.get("bits", bits),
                choice.get("group_size", group_size),
                choice.get("mode", mode),
            )
        else:
            report.quantized[path] = (bits, group_size, mode)
    if not report.quantized:
        kept = (
            f"; {len(report.protected)} more kept in floating point by the model's predicate"
            if report.protected
            else ""
        )
        if report.indivisible:
            raise _fail(
                f"group size {group_size} divides the last dimension of no layer (dimensions "
                f"{sorted(dims)}{kept}): nothing would be quantized; choose a smaller group size"
            )
        raise _fail(f"no layer can be quantized: all {len(report.protected)} are kept in floating point by the predicate")
    return report


def quantize(
    model: nn.Module,
    config: dict,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    mode: Optional[str] = None,
    recipe: Optional[str] = None,
) -> Tuple[nn.Module, dict, QuantReport]:
    """Quantize ``model`` in place with mlx-lm's ``quantize_model``; returns the model,
    the config with its ``quantization`` entry, and a report."""
    from mlx_lm.utils import compute_bits_per_weight, quantize_model

    if config.get("quantization") or config.get("quantization_config"):
        raise _fail(
            f"the model is already quantized ({describe(config.get('quantization'))}); "
            f"dequantize it first"
        )
    bits, group_size, mode = resolve_settings(bits, group_size, mode, recipe)
    predicate = build_predicate(model, group_size, recipe)
    report = plan(model, predicate, bits, group_size, mode, recipe)
    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints its own [INFO] line
        model, qconfig = quantize_model(model, config, group_size, bits, mode=mode, quant_predicate=predicate)
    done = {
        p
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    if done != set(report.quantized):  # pragma: no cover - plan() mirrors quantize_model
        raise _fail(f"internal error: quantized {len(done)} layers, planned {len(report.quantized)}")
    report.bits_per_weight = compute_bits_per_weight(model)
    return model, qconfig, report


def dequantize(model: nn.Module, config: dict) -> Tuple[nn.Module, dict]:
    """Undo ``quantize``: every quantized layer back to Linear / Embedding holding the
    dequantized weights (in the dtype of the scales); the config loses its quantization."""
    from mlx_lm.utils import dequantize_model

    if not config.get("quantization"):
        raise _fail("the model is not quantized; there is nothing to dequantize")
    config = dict(config)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    return dequantize_model(model), config


def quantized_paths(model: nn.Module) -> Dict[str, nn.Module]:
    return {
        p: m
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
