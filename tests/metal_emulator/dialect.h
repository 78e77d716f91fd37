// The Metal names the kernels use, declared in C++14 for tests/metal_emulator/dialect.py: a
// kernel's generated source is compiled against this header (not shim.h, which needs C++20)
// with -std=c++14 -pedantic-errors -fno-exceptions -fno-rtti -fsyntax-only, so C++17 / C++20
// constructs that Metal's C++14 dialect rejects fail. Declarations only: nothing here runs.
#pragma once
#include <cstddef>
#include <cstdint>

#define device
#define constant
#define thread
#define threadgroup
#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))
#define MAXFLOAT (3.40282347e+38f)
#define FLT_MAX (3.40282347e+38f)

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

namespace metal {

// half / bfloat: stored narrow, computed in float (conversions both ways are implicit)
template <class Self>
struct narrow_float {
  narrow_float() = default;
  narrow_float(float);
  operator float() const;
  template <class U> Self& operator+=(U);
  template <class U> Self& operator-=(U);
  template <class U> Self& operator*=(U);
  template <class U> Self& operator/=(U);
};
struct half : narrow_float<half> { using narrow_float<half>::narrow_float; };
struct bfloat : narrow_float<bfloat> { using narrow_float<bfloat>::narrow_float; };

template <class T>
struct vec3 {
  T x, y, z;
};
typedef vec3<uint> uint3;

enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);

template <class T> T simd_sum(T);
template <class T> T simd_max(T);
template <class T> T simd_min(T);
template <class T> T simd_product(T);
template <class T> T simd_prefix_inclusive_sum(T);
template <class T> T simd_prefix_exclusive_sum(T);
template <class T> T simd_broadcast(T, ushort);
template <class T> T simd_shuffle(T, ushort);
template <class T> T simd_shuffle_down(T, ushort);
template <class T> T simd_shuffle_up(T, ushort);
template <class T> T simd_shuffle_xor(T, ushort);
bool simd_any(bool);
bool simd_all(bool);

#define EMU_DIALECT_UNARY(name) template <class T> T name(T);
#define EMU_DIALECT_MATH                                                                   \
  EMU_DIALECT_UNARY(exp) EMU_DIALECT_UNARY(exp2) EMU_DIALECT_UNARY(log) EMU_DIALECT_UNARY(log2) \
  EMU_DIALECT_UNARY(sqrt) EMU_DIALECT_UNARY(rsqrt) EMU_DIALECT_UNARY(abs) EMU_DIALECT_UNARY(fabs) \
  EMU_DIALECT_UNARY(floor) EMU_DIALECT_UNARY(ceil) EMU_DIALECT_UNARY(round) EMU_DIALECT_UNARY(tanh) \
  EMU_DIALECT_UNARY(sin) EMU_DIALECT_UNARY(cos) EMU_DIALECT_UNARY(precise_divide)                  \
  template <class T> T max(T, T);                                                          \
  template <class T> T min(T, T);                                                          \
  template <class T> T fmax(T, T);                                                         \
  template <class T> T fmin(T, T);                                                         \
  template <class T> T pow(T, T);                                                          \
  template <class T> T clamp(T, T, T);                                                     \
  template <class T> T select(T, T, bool);                                                 \
  template <class T> bool isnan(T);                                                        \
  template <class T> bool isinf(T);                                                        \
  template <class T> bool isfinite(T);
EMU_DIALECT_MATH
namespace fast { EMU_DIALECT_MATH }
namespace precise { EMU_DIALECT_MATH }

template <class To, class From> To as_type(From);

}  // namespace metal

using namespace metal;
typedef half float16_t;
typedef bfloat bfloat16_t;

// what the emulator's translation unit (emulator.translation_unit) refers to
namespace emu {
struct ThreadIds {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, dispatch_threads_per_threadgroup, threads_per_grid;
  uint3 threadgroups_per_grid, grid_size, grid_origin;
  uint thread_index_in_simdgroup, simdgroup_index_in_threadgroup, thread_index_in_threadgroup;
  uint simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width;
  uint dispatch_simdgroups_per_threadgroup, quadgroup_index_in_threadgroup, quadgroups_per_threadgroup;
  uint thread_index_in_quadgroup, dispatch_quadgroups_per_threadgroup;
};
void* threadgroup_alloc(int id, std::size_t size, std::size_t align);
}  // namespace emu
