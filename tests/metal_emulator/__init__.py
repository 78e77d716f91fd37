"""A test-only emulator of MLX custom Metal kernels (``mx.fast.metal_kernel``) on Linux.

``EmulatedKernel`` takes the same constructor and call arguments as ``mx.fast.metal_kernel``.
A call asks MLX for the exact Metal source it generates for that call (traced under
``mx.export_function`` with ``verbose=True``, which works without Metal), compiles it as C++20
against ``shim.h`` (Metal types, math, atomics, SIMD-group functions) with ``runtime.h`` (a
fiber scheduler that plays one threadgroup at a time), and runs it in a subprocess on the
inputs' bytes. Builds are cached by content in ``$CHEEMS_MLX_EMULATOR_CACHE`` (default
``~/.cache/cheems_mlx_emulator``), which keeps the 500 most recently used builds
(``$CHEEMS_MLX_EMULATOR_CACHE_BUILDS``) and prunes older ones.

What it emulates:
- the grid counted in threads (dispatchThreads): the last threadgroup of a dimension is
  partial, ``threads_per_threadgroup`` is that threadgroup's actual size and
  ``dispatch_threads_per_threadgroup`` the requested one (both clamped to the grid, as MLX
  does); threads are numbered x-fastest and cut into 32-lane SIMD-groups;
- every thread a fiber: a threadgroup_barrier releases when all threads of the threadgroup
  wait at the same one, a SIMD-group function (simd_sum, simd_prefix_*, simd_shuffle*,
  simd_broadcast, simd_ballot/any/all, simdgroup_barrier) when all live lanes of the
  SIMD-group wait at the same call site. Errors, with the kernel's source lines: lanes or
  threads waiting at different sites (divergence, stricter than hardware: a SIMD-group
  function inside lane-dependent control flow is reported), a thread that returned while
  others wait at a barrier, a shuffle reading a lane that does not exist or has returned,
  more than 32 KiB of threadgroup memory or 1024 threads per threadgroup;
- poison: outputs without ``init_value`` and all threadgroup memory start as 0xFF bytes (NaN
  for floats, -1 for integers), so unwritten elements and uninitialised reads show;
- schedules: "inorder", "reverse", "random:<seed>" order the ready threads of a threadgroup
  each time they are resumed, and the threadgroups (reverse and random) -- a missing barrier
  shows as a wrong answer under some schedule;
- sanitizers: "address" (inputs, outputs and threadgroup arrays are exact-size heap blocks,
  so out-of-bounds indexing is reported with the kernel line), "thread" (each GPU thread a
  ThreadSanitizer fiber, barriers and SIMD-group functions are release/acquire: a race between
  threads of a threadgroup, or between threadgroups, is reported with both kernel lines);
- half as _Float16 (rounded every operation), bfloat in 16 bits rounded to nearest even,
  ``ensure_row_contiguous=False`` inputs in MLX's own strided layout.

What it cannot tell: Metal compile errors the C++ shim accepts (address-space mismatches,
C++-only features such as double, recursion or the std library), the precision of fast-math
functions, the hardware's reduction order inside SIMD-group functions (lane order here),
interleavings finer than barriers and SIMD-group functions (a thread runs uninterrupted
between them), simdgroup_matrix, quad_* functions, textures, packed vector types, and
anything about performance. Compare with tolerances by dtype (float32 ~1e-5 relative,
float16 ~1e-3, bfloat16 ~1e-2), never bit equality.
"""

from .emulator import EmulatedKernel, EmulatorError, generated_source, make_factory

__all__ = ["EmulatedKernel", "EmulatorError", "generated_source", "make_factory"]
