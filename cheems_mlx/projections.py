"""Several Linear layers of one input as one matrix product, inside the whole-model decode
step (``Model.compiled_step``).

A decode step on MLX's CPU backend costs microseconds per operation, and each Linear on a
(b, 1, d) input is four (the weight's transpose, flatten, product, unflatten). The SSD
mixer's C / B / X / dt projections, the attention's q / k / v and the MLP's gate / up each
read the same input, so the step multiplies once by their rows joined and slices the result.

The joined weight is built once, outside any trace, and the layers' own weights become views
of it (``W[a:b]``: no second copy in memory); checkpoints, LoRA, quantization and training
see the same separate Linear layers as before. ``refresh`` rebuilds a group whose layers or
weights changed since (a fine-tune, ``load_weights``, a LoRA or quantized layer put in their
place -- those are left unjoined) and reports it, so the caller drops traces that captured
the old joined weight. Only code run inside ``joined()`` uses the joined weights: the eager
and per-layer paths (prefill, training) multiply layer by layer as ever.
"""

import contextlib
import threading
from typing import Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

_ACTIVE = threading.local()


class Joined:
    """The joined weight (and bias) of ``owner``'s Linear layers ``attrs`` and the split
    points of its output."""

    def __init__(self, owner: nn.Module, attrs: Sequence[str]):
        linears = [owner[a] for a in attrs]
        sizes = [lin["weight"].shape[0] for lin in linears]
        self.weight = mx.concatenate([lin["weight"] for lin in linears], axis=0)
        has_bias = "bias" in linears[0]
        self.bias = mx.concatenate([lin["bias"] for lin in linears]) if has_bias else None
        mx.eval(self.weight, *([] if self.bias is None else [self.bias]))
        start = 0
        for lin, n in zip(linears, sizes):  # the layers' weights become views of it
            lin.weight = self.weight[start : start + n]
            if has_bias:
                lin.bias = self.bias[start : start + n]
            start += n
        mx.eval([lin.parameters() for lin in linears])
        self.splits = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]


def joinable(owner: nn.Module, attrs: Sequence[str]) -> bool:
    """Plain float Linear layers (no LoRA, no quantization) of one input size and dtype,
    all with or all without a bias."""
    linears = [owner.get(a) for a in attrs]
    if any(type(lin) is not nn.Linear for lin in linears):
        return False
    weights = [lin["weight"] for lin in linears]
    return (len({w.shape[1] for w in weights}) == 1 and len({w.dtype for w in weights}) == 1
            and len({"bias" in lin for lin in linears}) == 1)


def _members(owner: nn.Module, attrs: Sequence[str]) -> tuple:
    """The group's layers and their weights / biases, as objects (held: compared by ``is``)."""
    out = []
    for a in attrs:
        lin = owner.get(a)
        out += [lin, lin.get("weight"), lin.get("bias")] if isinstance(lin, nn.Module) else [lin]
    return tuple(out)


def refresh(groups: Sequence[Tuple[nn.Module, str, Tuple[str, ...]]]) -> bool:
    """Bring each group's joined weight up to date with its layers: (owner module, the name
    its ``Joined`` (or None: not joinable) is kept under, the Linear attributes). True when
    any group was (re)built -- traces holding an old joined weight must go."""
    changed = False
    for owner, name, attrs in groups:
        seen = owner.__dict__.get(name)
        if seen is not None and len(seen[0]) == len(now := _members(owner, attrs)) \
                and all(a is b for a, b in zip(seen[0], now)):
            continue
        joint = Joined(owner, attrs) if joinable(owner, attrs) else None
        # outside the module tree (no parameter, not saved); the members after the join
        object.__setattr__(owner, name, (_members(owner, attrs), joint))
        changed = True
    return changed


def remember(groups: Sequence[Tuple[nn.Module, str, Tuple[str, ...]]]) -> None:
    """Note the groups' layers and weights as they are now, joined or not: call after every
    traced call, since ``mx.compile`` hands a module's parameters back as new Python objects
    (the same arrays) once it has traced -- not a change of weights."""
    for owner, name, attrs in groups:
        seen = owner.__dict__.get(name)
        if seen is not None:
            object.__setattr__(owner, name, (_members(owner, attrs), seen[1]))


@contextlib.contextmanager
def joined():
    """Inside: ``project`` multiplies by the joined weights (``refresh`` just ran)."""
    previous = getattr(_ACTIVE, "on", False)
    _ACTIVE.on = True
    try:
        yield
    finally:
        _ACTIVE.on = previous


def project(owner: nn.Module, name: str, attrs: Sequence[str], x: mx.array) -> list:
    """The outputs of ``owner``'s Linear layers ``attrs`` for ``x``: one product by the joined
    weight inside ``joined()`` when the group has one, else layer by layer."""
    seen = owner.__dict__.get(name) if getattr(_ACTIVE, "on", False) else None
    joint: Optional[Joined] = None if seen is None else seen[1]
    if joint is None:
        return [owner[a](x) for a in attrs]
    y = x @ joint.weight.T if joint.bias is None else mx.addmm(joint.bias, x, joint.weight.T)
    return mx.split(y, joint.splits, axis=-1)
