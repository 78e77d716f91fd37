"""Run MLX custom Metal kernels on Linux: MLX's generated source compiled as C++ (shim.h) and
run by a fiber scheduler (runtime.h) in a subprocess. See the package docstring."""

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
COMPILER = os.environ.get("CXX", "g++")
BASE_FLAGS = ["-std=c++20", "-O1", "-g", "-w", "-fno-strict-aliasing", "-fwrapv", "-ffp-contract=off"]
SANITIZER_FLAGS = {
    None: [],
    "address": ["-fsanitize=address", "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}
RUN_TIMEOUT_S = 300

# dtype -> (numpy dtype of the raw storage, MLX's Metal type name)
DTYPES = {
    mx.bool_: (np.bool_, "bool"),
    mx.uint8: (np.uint8, "uint8_t"),
    mx.uint16: (np.uint16, "uint16_t"),
    mx.uint32: (np.uint32, "uint32_t"),
    mx.uint64: (np.uint64, "uint64_t"),
    mx.int8: (np.int8, "int8_t"),
    mx.int16: (np.int16, "int16_t"),
    mx.int32: (np.int32, "int32_t"),
    mx.int64: (np.int64, "int64_t"),
    mx.float16: (np.float16, "float16_t"),
    mx.bfloat16: (np.uint16, "bfloat16_t"),  # no numpy bfloat16: the raw 16-bit words
    mx.float32: (np.float32, "float"),
}

# The kernel-argument attributes MLX appends to the signature when their name is in the body.
BUILTINS = {
    "dispatch_quadgroups_per_threadgroup": "uint",
    "dispatch_simdgroups_per_threadgroup": "uint",
    "dispatch_threads_per_threadgroup": "uint3",
    "grid_origin": "uint3",
    "grid_size": "uint3",
    "quadgroup_index_in_threadgroup": "uint",
    "quadgroups_per_threadgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
    "simdgroups_per_threadgroup": "uint",
    "thread_execution_width": "uint",
    "thread_index_in_quadgroup": "uint",
    "thread_index_in_simdgroup": "uint",
    "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threadgroups_per_grid": "uint3",
    "threads_per_grid": "uint3",
    "threads_per_simdgroup": "uint",
    "threads_per_threadgroup": "uint3",
}


class EmulatorError(RuntimeError):
    """The kernel did not compile, crashed, or the emulator or a sanitizer found an error;
    the message carries the compiler's or the run's stderr."""


# ---- MLX's generated source ----------------------------------------------------------------


def _as_array(x):
    return x if isinstance(x, mx.array) else mx.array(x)


def _template_key(template):
    return tuple((n, str(v) if isinstance(v, mx.Dtype) else (type(v).__name__, v)) for n, v in template or ())


_capture_lock = threading.Lock()


def _capture_fd1(fn):
    """Run fn() and return what it wrote to file descriptor 1 (MLX prints from C++)."""
    with _capture_lock, tempfile.TemporaryFile() as tmp:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            fn()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode()


_sources = {}


def generated_source(name, input_names, output_names, source, header, inputs, output_shapes,
                     output_dtypes, grid, threadgroup, template=None, init_value=None,
                     ensure_row_contiguous=True, atomic_outputs=False):
    """The exact Metal source MLX generates for this call (traced under mx.export_function,
    verbose=True). It depends on the inputs' dtypes and on whether each is 0-d or has fewer
    than 8 elements, on the output dtypes and on the template; cached on those."""
    inputs = [_as_array(x) for x in inputs]
    key = (name, tuple(input_names), tuple(output_names), source, header,
           tuple((str(a.dtype), a.ndim == 0, a.size < 8) for a in inputs),
           tuple(str(d) for d in output_dtypes), _template_key(template), ensure_row_contiguous,
           atomic_outputs)
    if key not in _sources:
        kernel = mx.fast.metal_kernel(
            name=name, input_names=list(input_names), output_names=list(output_names),
            source=source, header=header, ensure_row_contiguous=ensure_row_contiguous,
            atomic_outputs=atomic_outputs,
        )

        def traced(*arrays):
            return kernel(inputs=list(arrays), output_shapes=[tuple(s) for s in output_shapes],
                          output_dtypes=list(output_dtypes), grid=tuple(grid),
                          threadgroup=tuple(threadgroup), template=template,
                          init_value=init_value, verbose=True)

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "kernel.mlxfn")
            out = _capture_fd1(lambda: mx.export_function(path, traced, *inputs))
        m = re.search(r"Generated source code for `[^`]*`:\n```\n(.*)\n```\n", out, re.S)
        if not m:
            raise EmulatorError(f"MLX printed no generated source for {name!r}; got:\n{out}")
        _sources[key] = m.group(1)
    return _sources[key]


# ---- parsing the generated source ----------------------------------------------------------


@dataclass
class Param:
    name: str
    ctype: str  # C++ type of the element (or of the value, for builtins)
    kind: str  # "pointer", "reference" (const constant T&) or "builtin"
    const: bool = False
    buffer: int = -1


@dataclass
class ParsedKernel:
    header: str
    template_params: str  # "typename T, int N" or ""
    function: str
    params: list
    body: str
    template_args: str  # "float16_t, 3, 1" or ""


_SIGNATURE = r"(?:template <(?P<tparams>[^\n]*)>\n)?\[\[kernel\]\] void (?P<fn>{fn}\w*)\(\n(?P<params>.*?)\) \{{\n"
_INSTANTIATION = re.compile(
    r'\ntemplate \[\[host_name\("(?P<host>\w+)"\)\]\] \[\[kernel\]\] '
    r"decltype\((?P<fn>\w+)<(?P<args>.*)>\) (?P=fn)<(?P=args)>;\n$"
)
_BUFFER_PARAM = re.compile(r"^(?P<const>const )?(?:device|constant) (?P<type>.+?)(?P<ref>[*&]) (?P<name>\w+) \[\[buffer\((?P<index>\d+)\)\]\]$")
_BUILTIN_PARAM = re.compile(r"^(?P<type>\w+) (?P<name>\w+) \[\[(?P<attr>\w+)\]\]$")


def parse_generated(text, name, source=None):
    """Split MLX's generated source into header, signature parameters, body and template
    arguments. Raises EmulatorError when the text does not have the layout this emulator was
    written against (a new MLX version changed its codegen)."""
    m = re.search(_SIGNATURE.format(fn=re.escape("custom_kernel_" + name)), text, re.S)
    if not m:
        raise EmulatorError(f"no `[[kernel]] void custom_kernel_{name}...(` signature in:\n{text}")
    rest = text[m.end():]
    if re.match(r"\s*device .*\[\[buffer\(\d+\)\]\]\) \{\n", rest):
        raise EmulatorError(
            "MLX generated a broken signature (a ') {' after an output before the last one: "
            "mlx 0.32 does this when an input's _shape/_strides/_ndim is used, there are several "
            "outputs and the body uses no thread attribute); Metal would not compile it either:\n"
            + text)
    template_args = ""
    inst = _INSTANTIATION.search(rest)
    if inst:
        if inst.group("fn") != m.group("fn") or inst.group("host") != m.group("fn"):
            raise EmulatorError(f"template instantiation of another kernel: {inst.group(0)!r}")
        template_args = inst.group("args")
        rest = rest[: inst.start()]
    elif m.group("tparams"):
        raise EmulatorError("templated kernel without an explicit instantiation")
    if not rest.endswith("\n}\n"):
        raise EmulatorError(f"kernel body does not end with '\\n}}\\n': {rest[-40:]!r}")
    body = rest[: -len("\n}\n")]
    if source is not None and body != source:
        raise EmulatorError("the generated kernel body differs from the source given")
    params = []
    for line in m.group("params").split(",\n"):
        line = line.strip()
        b = _BUFFER_PARAM.match(line)
        if b:
            params.append(Param(b["name"], b["type"], "pointer" if b["ref"] == "*" else "reference",
                                bool(b["const"]), int(b["index"])))
            continue
        a = _BUILTIN_PARAM.match(line)
        if a and a["name"] == a["attr"] and BUILTINS.get(a["name"]) == a["type"]:
            params.append(Param(a["name"], a["type"], "builtin"))
            continue
        raise EmulatorError(f"unrecognised kernel parameter: {line!r}")
    indices = [p.buffer for p in params if p.kind != "builtin"]
    if indices != list(range(len(indices))):
        raise EmulatorError(f"buffer indices are not 0..n-1 in order: {indices}")
    return ParsedKernel(text[: m.start()], m.group("tparams") or "", m.group("fn"), params, body,
                        template_args)


# ---- C++ translation unit ------------------------------------------------------------------

_METAL_ATTRIBUTE = re.compile(r"\[\[\s*(?!(?:likely|unlikely|maybe_unused|fallthrough|nodiscard|noreturn)\s*\]\])[^\[\]]*\]\]")
_METAL_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<metal_\w+>[ \t]*$", re.M)
_THREADGROUP_STATEMENT = re.compile(r"\bthreadgroup\s+([^;{}]*);")
_THREADGROUP_DECL = re.compile(r"^(?P<type>[A-Za-z_][\w:<>, ]*?)\s+(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\[\]]+\]\s*)*)$")


def _strip_brackets(s):
    while True:
        t = re.sub(r"\[[^\[\]]*\]", "", s)
        if t == s:
            return s
        s = t


def rewrite_threadgroup_arrays(body):
    """`threadgroup T name[N]...;` -> a reference to one allocation per threadgroup (poisoned),
    on the same line. Returns (new body, number of declarations)."""
    count = 0

    def sub(m):
        nonlocal count
        decl = " ".join(m.group(1).split())
        if re.search(r"[=*&()]", _strip_brackets(decl)):
            return m.group(0)  # a pointer, reference or cast: `threadgroup` is just a qualifier
        d = _THREADGROUP_DECL.match(decl)
        if not d:
            raise EmulatorError(f"cannot emulate threadgroup declaration {m.group(0)!r}: declare "
                                "one variable or array per statement")
        t, name, dims = d["type"], d["name"], d["dims"].replace(" ", "")
        i = count
        count += 1
        if dims:
            return (f"{t} (&{name}){dims} = *static_cast<{t} (*){dims}>(::emu::threadgroup_alloc("
                    f"{i}, sizeof({t}{dims}), alignof({t})));")
        return f"{t}& {name} = *static_cast<{t}*>(::emu::threadgroup_alloc({i}, sizeof({t}), alignof({t})));"

    return _THREADGROUP_STATEMENT.sub(sub, body), count


def translation_unit(parsed, label):
    """The C++ program for one generated kernel. #line directives make compiler and sanitizer
    messages name `label`.metal with lines counted in header + source concatenated (the
    lines of a metal_kernels/*.metal file split at its body marker), and `label`.signature
    for the parameters MLX generated."""
    header = _METAL_ATTRIBUTE.sub("", _METAL_INCLUDE.sub("", parsed.header))
    body, n_arrays = rewrite_threadgroup_arrays(_METAL_ATTRIBUTE.sub("", parsed.body))
    params = []
    args = []
    for p in parsed.params:
        if p.kind == "builtin":
            params.append(f"{p.ctype} {p.name}")
            args.append(f"t.{p.name}")
        else:
            const = "const " if p.const else ""
            ref = "*" if p.kind == "pointer" else "&"
            params.append(f"{const}{p.ctype}{ref} {p.name}")
            cast = f"static_cast<{const}{p.ctype}*>(b[{p.buffer}])"
            args.append(cast if p.kind == "pointer" else "*" + cast)
    n_buffers = sum(p.kind != "builtin" for p in parsed.params)
    template = f"template <{parsed.template_params}>\n" if parsed.template_params else ""
    targs = f"<{parsed.template_args}>" if parsed.template_args else ""
    nl = "\n"
    return (
        '#include "shim.h"\n'
        "namespace emu_kernel {\n"
        f'#line 1 "{label}.metal"\n'
        f"{header}\n"
        f'#line 1 "{label}.signature"\n'
        f"{template}void {parsed.function}(\n  {(','+nl+'  ').join(params)}) {{\n"
        f'#line {parsed.header.count(nl) + 1} "{label}.metal"\n'
        f"{body}\n"
        "}\n"
        f'#line 1 "{label}.launch"\n'
        f"constexpr int emu_num_buffers = {n_buffers};\n"
        f"constexpr int emu_num_threadgroup_arrays = {n_arrays};\n"
        "void emu_launch(void* const* b, const emu::ThreadIds& t) {\n"
        f"  {parsed.function}{targs}(\n    {(','+nl+'    ').join(args)});\n"
        "}\n"
        "}  // namespace emu_kernel\n"
        '#include "runtime.h"\n'
    )


# ---- compiling -----------------------------------------------------------------------------


def cache_dir():
    d = Path(os.environ.get("CHEEMS_MLX_EMULATOR_CACHE") or Path.home() / ".cache" / "cheems_mlx_emulator")
    d.mkdir(parents=True, exist_ok=True)
    return d


# The cache keeps the MAX_BUILDS most recently used kernel builds (about 1 MB each; a whole test
# run uses about 210, so two checkouts with different kernels still share it without
# rebuilding) and the MAX_SHIMS most recently used precompiled shims (one per shim version and
# sanitizer); every new build prunes the least recently used beyond those counts.
MAX_BUILDS = int(os.environ.get("CHEEMS_MLX_EMULATOR_CACHE_BUILDS", "500"))
MAX_SHIMS = 6


def _touch(path):
    """Mark ``path`` used now (its mtime orders the pruning); False when it is gone."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:  # pruned by another process meanwhile
        return False


def prune_cache(d, max_builds=None, max_shims=None):
    """Delete the least recently used builds in ``d`` beyond ``max_builds`` (an executable and,
    once no executable of it is left, its source) and the precompiled shims beyond
    ``max_shims``. Returns the names deleted."""
    max_builds = MAX_BUILDS if max_builds is None else max_builds
    max_shims = MAX_SHIMS if max_shims is None else max_shims

    def by_age(paths):  # newest first; a path another process deleted meanwhile drops out
        aged = []
        for p in paths:
            try:
                aged.append((p.stat().st_mtime_ns, p.name, p))
            except FileNotFoundError:
                pass
        return [p for *_, p in sorted(aged, reverse=True)]

    removed = []
    for exe in by_age(d.glob("*.bin"))[max_builds:]:
        exe.unlink(missing_ok=True)
        removed.append(exe.name)
        key = exe.name.split(".", 1)[0]
        if not any(d.glob(f"{key}.*.bin")):
            (d / f"{key}.cpp").unlink(missing_ok=True)
            removed.append(f"{key}.cpp")
    for pch in by_age(p for p in d.glob("pch-*") if p.is_dir())[max_shims:]:
        shutil.rmtree(pch, ignore_errors=True)
        removed.append(pch.name)
    return removed


@functools.lru_cache(maxsize=None)
def _runtime_digest():
    h = hashlib.sha256()
    for f in ("shim.h", "runtime.h"):
        h.update((HERE / f).read_bytes())
    return h.hexdigest()


_compile_lock = threading.Lock()


def _compile(d, args, output):
    """Run the compiler in `d` into a temporary name, then rename to `output` (atomic: other
    test processes sharing the cache see no half-written file)."""
    tmp = d / f".{output.name}.{os.getpid()}.tmp"
    # Reports name the kernel's lines `<name>.metal:LINE`, not a path in the cache.
    r = subprocess.run([COMPILER, *args, f"-fdebug-prefix-map={d}=.", "-o", tmp.name],
                       capture_output=True, text=True, cwd=d)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise EmulatorError(f"compiling in {d} failed:\n{r.stderr}")
    os.replace(tmp, output)


def _precompiled_shim(d, flags, tag):
    """A folder holding shim.h and its precompiled header for these flags (a third of a
    kernel's compile time is parsing the shim)."""
    pch = d / f"pch-{_runtime_digest()[:16]}-{tag}"
    if not ((pch / "shim.h.gch").exists() and _touch(pch)):
        pch.mkdir(exist_ok=True)
        if not (pch / "shim.h").exists():
            tmp = pch / f".shim.h.{os.getpid()}.tmp"
            tmp.write_bytes((HERE / "shim.h").read_bytes())
            os.replace(tmp, pch / "shim.h")
        _compile(pch, [*flags, "-x", "c++-header", "shim.h"], pch / "shim.h.gch")
    return pch


def compile_kernel(cpp, sanitizer=None):
    """Path of the executable for this translation unit, built once per content + flags into
    the cache folder."""
    flags = BASE_FLAGS + SANITIZER_FLAGS[sanitizer]
    tag = sanitizer or "plain"
    key = hashlib.sha256("\0".join([cpp, _runtime_digest(), COMPILER, *flags]).encode()).hexdigest()[:32]
    d = cache_dir()
    exe = d / f"{key}.{tag}.bin"
    if exe.exists() and _touch(exe):
        return exe
    with _compile_lock:
        src = d / f"{key}.cpp"
        if not src.exists():
            tmp = d / f".{key}.{os.getpid()}.cpp"
            tmp.write_text(cpp)
            os.replace(tmp, src)
        pch = _precompiled_shim(d, flags, tag)
        _compile(d, [*flags, "-I", str(pch), "-I", str(HERE), src.name], exe)
        prune_cache(d)
    return exe


# ---- running -------------------------------------------------------------------------------


def _schedule_spec(schedule):
    if schedule in ("inorder", "reverse"):
        return f"{schedule} 0"
    m = re.fullmatch(r"random:(\d+)", schedule or "")
    if not m:
        raise ValueError(f"schedule must be 'inorder', 'reverse' or 'random:<seed>', not {schedule!r}")
    return f"random {m.group(1)}"


def _storage(dtype):
    return _dtype_info(dtype)[0]


def _metal_type(dtype):
    return _dtype_info(dtype)[1]


def _dtype_info(dtype):
    if dtype not in DTYPES:
        raise EmulatorError(f"dtype {dtype} is not supported by Metal kernels or the emulator")
    return DTYPES[dtype]


def _numpy_view(a):
    """A numpy array sharing `a`'s memory and layout (bfloat16 as its 16-bit words)."""
    mx.eval(a)
    return np.asarray(memoryview(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a))


def _input_buffer(a, row_contiguous):
    """(bytes, shape, element strides) of an input as the kernel sees it: row-major when MLX
    makes it contiguous, else MLX's own layout, in a buffer just covering the elements."""
    _dtype_info(a.dtype)
    arr = _numpy_view(a)
    if arr.size and not row_contiguous and not arr.flags.c_contiguous and min(arr.strides) >= 0:
        strides = [s // arr.itemsize for s in arr.strides]
        span = sum((n - 1) * s for n, s in zip(arr.shape, strides)) + 1
        base = np.frombuffer(bytearray(b"\xff" * (span * arr.itemsize)), arr.dtype)
        np.lib.stride_tricks.as_strided(base, arr.shape, arr.strides)[...] = arr
        return base.tobytes(), list(arr.shape), strides
    arr = np.ascontiguousarray(arr)
    strides = [int(np.prod(arr.shape[i + 1:], dtype=np.int64)) for i in range(arr.ndim)]
    return arr.tobytes(), list(arr.shape), strides


def _output_bytes(shape, dtype, init_value):
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(_storage(dtype)).itemsize
    if init_value is None:
        return b"\xff" * n  # poison: NaN for floats, all ones for integers
    return _numpy_view(mx.full(tuple(shape), init_value, dtype=dtype)).tobytes()


def _to_mlx(data, shape, dtype):
    arr = np.frombuffer(data, _storage(dtype)).reshape(shape)
    out = mx.array(arr)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


def run_kernel(exe, buffers, grid, threadgroup, schedule):
    """Run a compiled kernel on `buffers` ([(bytes, is_output)], in [[buffer(i)]] order);
    return the outputs' bytes."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # sanitizers must load first
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1"
    env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=66:report_signal_unsafe=0"
    with tempfile.TemporaryDirectory(prefix="metal_emulator_") as d:
        lines = [f"grid {' '.join(map(str, grid))}", f"threadgroup {' '.join(map(str, threadgroup))}",
                 f"schedule {_schedule_spec(schedule)}"]
        for i, (data, is_output) in enumerate(buffers):
            path = os.path.join(d, f"b{i}")
            with open(path, "wb") as f:
                f.write(data)
            lines.append(f"buffer {len(data)} {'out' if is_output else 'in'} {path}")
        spec = os.path.join(d, "spec")
        with open(spec, "w") as f:
            f.write("\n".join(lines) + "\n")
        try:
            r = subprocess.run([str(exe), spec], capture_output=True, text=True, env=env,
                               timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise EmulatorError(f"kernel run timed out after {RUN_TIMEOUT_S} s ({exe})") from e
        if r.returncode != 0 or "Sanitizer" in r.stderr:
            raise EmulatorError(f"kernel run failed (exit status {r.returncode}, {exe}):\n{r.stderr}")
        outputs = []
        for i, (_, is_output) in enumerate(buffers):
            if is_output:
                with open(os.path.join(d, f"b{i}"), "rb") as f:
                    outputs.append(f.read())
        return outputs


class EmulatedKernel:
    """Drop-in for mx.fast.metal_kernel: same constructor, same call."""

    def __init__(self, name, input_names, output_names, source, header="",
                 ensure_row_contiguous=True, atomic_outputs=False, schedule="inorder",
                 sanitizer=None, compile_options=None):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if sanitizer not in SANITIZER_FLAGS:
            raise ValueError(f"sanitizer must be None, 'address' or 'thread', not {sanitizer!r}")
        _schedule_spec(schedule)
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self.schedule = schedule
        self.sanitizer = sanitizer
        self.compile_options = compile_options  # math mode: not modelled

    def __call__(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        del stream  # one emulated device
        inputs = [_as_array(x) for x in inputs]
        for what, got, want in (("inputs", inputs, self.input_names),
                                ("output_shapes", output_shapes, self.output_names),
                                ("output_dtypes", output_dtypes, self.output_names)):
            if len(got) != len(want):
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {len(want)} but got size {len(got)}.")
        text = generated_source(
            self.name, self.input_names, self.output_names, self.source, self.header, inputs,
            output_shapes, output_dtypes, grid, threadgroup, template, init_value,
            self.ensure_row_contiguous, self.atomic_outputs,
        )
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{text}\n```")
        parsed = parse_generated(text, self.name, self.source)
        exe = compile_kernel(translation_unit(parsed, self.name), self.sanitizer)
        buffers = self._buffers(parsed, inputs, output_shapes, output_dtypes, init_value)
        data = run_kernel(exe, buffers, grid, threadgroup, self.schedule)
        return [_to_mlx(d, tuple(s), t) for d, s, t in zip(data, output_shapes, output_dtypes)]

    def _buffers(self, parsed, inputs, output_shapes, output_dtypes, init_value):
        """The bytes of every [[buffer(i)]] of the generated signature, by parameter name."""
        by_name = {}
        for name, a in zip(self.input_names, inputs):
            data, shape, strides = _input_buffer(a, self.ensure_row_contiguous)
            by_name[name] = (data, False, _metal_type(a.dtype))
            by_name[name + "_shape"] = (np.array(shape, np.int32).tobytes(), False, "int")
            by_name[name + "_strides"] = (np.array(strides, np.int64).tobytes(), False, "int64_t")
            by_name[name + "_ndim"] = (np.int32(a.ndim).tobytes(), False, "int")
        for name, shape, dtype in zip(self.output_names, output_shapes, output_dtypes):
            by_name[name] = (_output_bytes(shape, dtype, init_value), True, _metal_type(dtype))
        buffers = []
        for p in parsed.params:
            if p.kind == "builtin":
                continue
            data, is_output, ctype = by_name[p.name]
            if p.ctype not in (ctype, f"atomic<{ctype}>"):
                raise EmulatorError(f"buffer {p.name}: signature type {p.ctype}, data of type {ctype}")
            buffers.append((data, is_output))
        return buffers


@functools.lru_cache(maxsize=None)
def make_factory(schedule="inorder", sanitizer=None):
    """A callable with mx.fast.metal_kernel's constructor signature building EmulatedKernels.
    One object per (schedule, sanitizer), kept alive: callers may key caches on its id()."""

    def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                     atomic_outputs=False, compile_options=None):
        return EmulatedKernel(name, input_names, output_names, source, header, ensure_row_contiguous,
                              atomic_outputs, schedule=schedule, sanitizer=sanitizer,
                              compile_options=compile_options)

    return metal_kernel
