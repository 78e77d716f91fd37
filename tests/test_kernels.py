"""The safety net of cheems_mlx.kernels: a Metal kernel that fails to build, fails to launch or
computes wrong never reaches a user's tokens.

Through ``kernels.backend(factory)`` with faulty factories (builds that raise like a Metal
compiler error; kernels that return zeros), generation of the default model (float32,
greedy, 12 tokens through mlx-lm's ``generate_step``) must give exactly the ops path's
tokens (the reference: the same model with no kernel backend, which on Linux is the ops
path) and exactly one ``KernelWarning`` per failing kernel, naming it. The self-check's
verdicts are cached on disk (each test has its own cache folder: conftest) and
``CHEEMS_MLX_KERNELS`` chooses never / once / every process.
"""

import json
import warnings

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

import cheems_mlx
from cheems_mlx import kernels
from cheems_mlx.cdmoe import product_key_route_kernel

from conftest import KERNEL_DTYPES, KERNEL_TOL
from metal_emulator import make_factory

STEPS = 12
DEFAULT_MODEL_KERNELS = {"ssd_scan", "ssd_step", "dma_prefill", "dma_decode", "dma_decode_combine",
                         "cdmoe_route", "cdmoe_mix"}


@pytest.fixture(scope="module")
def default_model():
    model, tokenizer = cheems_mlx.load(None)
    model.set_dtype(mx.float32)
    # longer than SSDCache.window (16): a shorter prefill keeps its per-token states on the ops
    # path, and the scan kernel would not run
    prompt = mx.array(tokenizer.encode("In the beginning God created the heaven and the earth. And the earth "
                                       "was without form, and void"))
    assert prompt.size > 17
    return model, prompt


def greedy(model, prompt):
    return [int(tok) for tok, _ in generate_step(prompt, model, max_tokens=STEPS)]


@pytest.fixture(scope="module")
def ops_tokens(default_model):
    assert not kernels.enabled()  # no Metal here: the model runs its ops path
    return greedy(*default_model)


class FaultyFactory:
    """Kernels that fail: ``raise`` -- every build fails, as Metal's compiler would on a source
    it rejects; ``zeros`` -- kernels that build and launch but compute zeros. ``only``: just
    that kernel, the others run on the emulator."""

    def __init__(self, fault, only=None):
        self.fault, self.only, self.fallback, self.built, self.emulated = fault, only, make_factory(), [], set()

    def __call__(self, name, *args, **kwargs):
        if self.only is not None and name != self.only:
            self.emulated.add(name)
            return self.fallback(name, *args, **kwargs)
        self.built.append(name)
        if self.fault == "raise":
            raise RuntimeError(f"program_source:12:3: error: use of undeclared identifier 'simd_sum' ({name})")
        return lambda output_shapes, output_dtypes, **_: [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]


def generate_with(factory, default_model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kernels.backend(factory):
            tokens = greedy(*default_model)
            aside = kernels.set_aside()
    return tokens, [str(w.message) for w in caught if issubclass(w.category, kernels.KernelWarning)], aside


def named(messages, name):
    return [m for m in messages if f"Metal kernel {name} " in m]


@pytest.mark.parametrize("fault", ["raise", "zeros"])
def test_faulty_kernels_leave_the_ops_path_tokens_and_one_warning_each(fault, default_model, ops_tokens):
    factory = FaultyFactory(fault)
    tokens, messages, aside = generate_with(factory, default_model)
    assert tokens == ops_tokens
    # every kernel the model launches is set aside; dma_decode_combine is never reached (the
    # decode pair falls back at dma_decode, which launches first)
    failed = DEFAULT_MODEL_KERNELS - {"dma_decode_combine"}
    assert set(factory.built) <= DEFAULT_MODEL_KERNELS
    assert {name for name, _ in aside} == failed
    assert len(messages) == len(failed), messages
    for name in failed:
        (message,) = named(messages, name)
        assert mx.__version__ in message and "python -m cheems_mlx.doctor" in message
        assert "device test backend FaultyFactory" in message


@pytest.mark.parametrize("fault,kernel", [("raise", "dma_prefill"), ("zeros", "ssd_step"), ("zeros", "cdmoe_route")])
def test_one_faulty_kernel_among_working_ones(fault, kernel, default_model, ops_tokens):
    """The other kernels (emulated) keep running; only the faulty one falls back, with one warning."""
    factory = FaultyFactory(fault, only=kernel)
    tokens, messages, aside = generate_with(factory, default_model)
    assert tokens == ops_tokens
    assert factory.emulated == DEFAULT_MODEL_KERNELS - {kernel}
    assert len(messages) == 1 and named(messages, kernel), messages
    assert {name for name, _ in aside} == {kernel}
    why = "failed to build" if fault == "raise" else "differs from the ops path"
    assert why in messages[0]


def test_a_set_aside_state_does_not_leak_between_backends():
    factory = FaultyFactory("zeros")
    sx = kernels.probe((3, 8), 1)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with kernels.backend(factory):
                assert kernels.attempt(product_key_route_kernel, sx, sx, 8, 4, False) is None
                assert kernels.attempt(product_key_route_kernel, sx, sx, 8, 4, False) is None
                assert [name for name, _ in kernels.set_aside()] == ["cdmoe_route"]
        assert len(caught) == 1  # one warning per backend (a fresh state each time)
    assert kernels.set_aside() == {}


class CountingChecks:
    def __init__(self, monkeypatch, name):
        self.calls = 0
        real = kernels.CHECKS[name]

        def check(**kw):
            self.calls += 1
            return real(**kw)

        monkeypatch.setitem(kernels.CHECKS, name, check)


def route_once(factory):
    sx, sy = kernels.probe((3, 8), 1), kernels.probe((3, 8), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kernels.backend(factory):
            out = kernels.attempt(product_key_route_kernel, sx, sy, 8, 4, False)
    return out, [str(w.message) for w in caught]


def test_verdicts_are_cached_on_disk_and_rechecked_on_request(monkeypatch):
    counting = CountingChecks(monkeypatch, "cdmoe_route")
    out, messages = route_once(FaultyFactory("zeros"))
    assert out is None and counting.calls == 1 and "differs from the ops path" in messages[0]
    (path,) = (kernels.cache_dir() / "kernel-checks").glob("cdmoe_route-*.json")
    verdict = json.loads(path.read_text())
    assert verdict["ok"] is False and verdict["mlx"] == mx.__version__
    assert verdict["source"] == kernels.source_hash("cdmoe_route") and verdict["device"].startswith("test backend")

    out, messages = route_once(FaultyFactory("zeros"))  # a later process: the verdict is read, not re-run
    assert out is None and counting.calls == 1 and "verdict cached" in messages[0]

    monkeypatch.setenv("CHEEMS_MLX_KERNELS", "check")
    out, messages = route_once(FaultyFactory("zeros"))
    assert out is None and counting.calls == 2 and "verdict cached" not in messages[0]


def test_a_passing_kernel_is_checked_once_and_used(monkeypatch):
    counting = CountingChecks(monkeypatch, "cdmoe_route")
    for _ in range(2):
        out, messages = route_once(make_factory())
        assert out is not None and messages == []
    assert counting.calls == 1
    (path,) = (kernels.cache_dir() / "kernel-checks").glob("cdmoe_route-*.json")
    assert json.loads(path.read_text())["ok"] is True


def test_a_verdict_depends_on_the_kernel_source(monkeypatch):
    counting = CountingChecks(monkeypatch, "cdmoe_route")
    route_once(make_factory())
    real = kernels.source
    monkeypatch.setattr(kernels, "source", lambda name: (real(name)[0] + "// edited\n", real(name)[1]))
    route_once(make_factory())
    assert counting.calls == 2 and len(list((kernels.cache_dir() / "kernel-checks").glob("*.json"))) == 2


def test_a_launch_error_sets_the_family_aside(monkeypatch):
    """A kernel with no self-check declared, failing at launch: the call falls back too."""
    monkeypatch.delitem(kernels.CHECKS, "cdmoe_route")

    def factory(name, *args, **kwargs):
        def launch(**_):
            raise RuntimeError("[metal::Device] Unable to build compute pipeline: threadgroup memory exceeded")
        return launch

    out, messages = route_once(factory)
    assert out is None and len(messages) == 1 and "failed to launch" in messages[0]


def test_kernels_off_and_unknown_mode(monkeypatch):
    monkeypatch.setenv("CHEEMS_MLX_KERNELS", "0")
    with kernels.backend(make_factory()):
        assert not kernels.enabled()
    monkeypatch.setenv("CHEEMS_MLX_KERNELS", "yes")
    with kernels.backend(make_factory()), pytest.warns(kernels.KernelWarning, match="CHEEMS_MLX_KERNELS"):
        assert kernels.enabled()


def test_self_checks_use_the_kernel_tests_tolerances():
    assert {name: kernels.TOLERANCE[dtype] for name, dtype in KERNEL_DTYPES.items()} == KERNEL_TOL


def test_every_kernel_declares_a_self_check():
    import cheems_mlx.cdmoe, cheems_mlx.dma, cheems_mlx.ssd  # noqa: E401, F401 -- they register
    names = {p.stem for p in kernels.resources.files("cheems_mlx.metal_kernels").iterdir()
             if p.name.endswith(".metal") and kernels.BODY_MARKER in p.read_text()}  # not the *_common helpers
    assert names == set(kernels.CHECKS)


def test_a_broken_self_check_sets_the_kernel_aside_for_this_process_only(monkeypatch):
    """A check whose ops side cannot run (a bug, or a check reached inside mx.compile) does not
    trust the kernel, and records nothing on disk about it."""

    def broken(**_):
        def ops_fn(*_):
            raise RuntimeError("eval inside a trace")
        return kernels.SelfCheck(product_key_route_kernel, ops_fn, (), 1e-5)

    monkeypatch.setitem(kernels.CHECKS, "cdmoe_route", broken)
    out, messages = route_once(make_factory())
    assert out is None and len(messages) == 1 and "the ops side of the check failed" in messages[0]
    assert not list(kernels.cache_dir().glob("kernel-checks/*.json"))
