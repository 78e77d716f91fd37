// Metal Shading Language, as far as MLX custom kernels use it, mapped onto C++20 (g++ 12).
//
// The translation unit the emulator compiles is: this header, then the MLX-generated kernel
// (header + signature + body, attributes stripped, `threadgroup` arrays rewritten by
// emulator.py) inside `namespace emu_kernel`, then a launch function, then runtime.h.
// What is here: address-space words defined away, half (_Float16, rounded every operation)
// and bfloat (16-bit storage, round-to-nearest-even, float arithmetic), vector types with
// swizzles, metal:: / fast:: / precise:: math, as_type, atomics (std::atomic_ref), SIMD-group
// collectives and barriers (which hand control to the fiber scheduler in runtime.h), and the
// part of MLX's Metal utils header (float16_t, bfloat16_t, Limits, elem_to_loc...) that
// MLX prepends to every custom kernel.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <source_location>
#include <type_traits>
#include <vector>

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---- scalar types -----------------------------------------------------------------------

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;

constexpr half operator""h(long double v) { return half(v); }
constexpr half operator""h(unsigned long long v) { return half(v); }

// bfloat: 16-bit storage, every operation done in float and rounded to nearest even.
struct bfloat {
  uint16_t bits;

  static constexpr uint16_t round(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
  static constexpr bfloat from_bits(uint16_t b) {
    bfloat r{};
    r.bits = b;
    return r;
  }

  bfloat() = default;
  template <class T>
    requires(std::is_arithmetic_v<T> || std::is_same_v<T, half>)
  constexpr bfloat(T v) : bits(round(float(v))) {}
  constexpr operator float() const { return __builtin_bit_cast(float, uint32_t(bits) << 16); }

  template <class T>
  bfloat& operator+=(T v) { return *this = bfloat(float(*this) + float(v)); }
  template <class T>
  bfloat& operator-=(T v) { return *this = bfloat(float(*this) - float(v)); }
  template <class T>
  bfloat& operator*=(T v) { return *this = bfloat(float(*this) * float(v)); }
  template <class T>
  bfloat& operator/=(T v) { return *this = bfloat(float(*this) / float(v)); }
  bfloat& operator++() { return *this += 1.0f; }
  bfloat& operator--() { return *this -= 1.0f; }
  bfloat operator++(int) { bfloat r = *this; *this += 1.0f; return r; }
  bfloat operator--(int) { bfloat r = *this; *this -= 1.0f; return r; }
};

namespace emu {
template <class T>
concept scalar = std::is_arithmetic_v<T> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>;

// bfloat op x: float when x is float or half (as in Metal), else bfloat.
template <class A, class B>
using bf_result = std::conditional_t<std::is_floating_point_v<A> || std::is_floating_point_v<B> ||
                                         std::is_same_v<A, half> || std::is_same_v<B, half>,
                                     float, bfloat>;
template <class A, class B>
concept bf_operands = scalar<A> && scalar<B> && (std::is_same_v<A, bfloat> || std::is_same_v<B, bfloat>);
}  // namespace emu

#define EMU_BF_ARITH(op)                                                        \
  template <class A, class B>                                                   \
    requires emu::bf_operands<A, B>                                             \
  constexpr emu::bf_result<A, B> operator op(A a, B b) {                        \
    return emu::bf_result<A, B>(float(a) op float(b));                          \
  }
#define EMU_BF_COMPARE(op)                                                      \
  template <class A, class B>                                                   \
    requires emu::bf_operands<A, B>                                             \
  constexpr bool operator op(A a, B b) { return float(a) op float(b); }
EMU_BF_ARITH(+)
EMU_BF_ARITH(-)
EMU_BF_ARITH(*)
EMU_BF_ARITH(/)
EMU_BF_COMPARE(==)
EMU_BF_COMPARE(!=)
EMU_BF_COMPARE(<)
EMU_BF_COMPARE(<=)
EMU_BF_COMPARE(>)
EMU_BF_COMPARE(>=)
#undef EMU_BF_ARITH
#undef EMU_BF_COMPARE
constexpr bfloat operator-(bfloat a) { return bfloat::from_bits(uint16_t(a.bits ^ 0x8000u)); }
constexpr bfloat operator+(bfloat a) { return a; }

// ---- vector types -----------------------------------------------------------------------

template <class T, int N>
struct vec;

namespace emu {
// A swizzle (v.xy, v.zyx, ...): a view of the vector's storage S components.
template <class T, int S, int... I>
struct swizzle {
  T e[S];
  T get(int i) const {
    constexpr int index[] = {I...};
    return e[index[i]];
  }
  operator vec<T, int(sizeof...(I))>() const;
  swizzle& operator=(const vec<T, int(sizeof...(I))>& v);
  swizzle& operator=(const swizzle& o) { return *this = vec<T, int(sizeof...(I))>(o); }
};

template <class X>
struct vtraits {
  static constexpr bool is_vec = false;
};
template <class T, int N>
struct vtraits<vec<T, N>> {
  static constexpr bool is_vec = true;
  using elem = T;
  static constexpr int size = N;
};
template <class T, int S, int... I>
struct vtraits<swizzle<T, S, I...>> {
  static constexpr bool is_vec = true;
  using elem = T;
  static constexpr int size = int(sizeof...(I));
};
template <class X>
concept vector_like = vtraits<std::remove_cvref_t<X>>::is_vec;
template <class X>
constexpr int vsize() {
  if constexpr (vector_like<X>) {
    return vtraits<std::remove_cvref_t<X>>::size;
  } else {
    return 1;
  }
}

template <class T, int N>
struct vec_storage;
#define EMU_SW2(S, a, b, i, j) swizzle<T, S, i, j> a##b;
#define EMU_SW3(S, a, b, c, i, j, k) swizzle<T, S, i, j, k> a##b##c;
template <class T>
struct vec_storage<T, 2> {
  union {
    T e[2];
    struct { T x, y; };
    struct { T r, g; };
    EMU_SW2(2, x, x, 0, 0) EMU_SW2(2, x, y, 0, 1) EMU_SW2(2, y, x, 1, 0) EMU_SW2(2, y, y, 1, 1)
    EMU_SW2(2, r, g, 0, 1) EMU_SW2(2, g, r, 1, 0)
  };
};
template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 3> {
  union {
    T e[3];
    struct { T x, y, z; };
    struct { T r, g, b; };
    EMU_SW2(3, x, x, 0, 0) EMU_SW2(3, x, y, 0, 1) EMU_SW2(3, x, z, 0, 2)
    EMU_SW2(3, y, x, 1, 0) EMU_SW2(3, y, y, 1, 1) EMU_SW2(3, y, z, 1, 2)
    EMU_SW2(3, z, x, 2, 0) EMU_SW2(3, z, y, 2, 1) EMU_SW2(3, z, z, 2, 2)
    EMU_SW3(3, x, y, z, 0, 1, 2) EMU_SW3(3, z, y, x, 2, 1, 0)
    EMU_SW2(3, r, g, 0, 1) EMU_SW3(3, r, g, b, 0, 1, 2)
  };
};
template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 4> {
  union {
    T e[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    EMU_SW2(4, x, x, 0, 0) EMU_SW2(4, x, y, 0, 1) EMU_SW2(4, x, z, 0, 2) EMU_SW2(4, x, w, 0, 3)
    EMU_SW2(4, y, x, 1, 0) EMU_SW2(4, y, y, 1, 1) EMU_SW2(4, y, z, 1, 2) EMU_SW2(4, y, w, 1, 3)
    EMU_SW2(4, z, x, 2, 0) EMU_SW2(4, z, y, 2, 1) EMU_SW2(4, z, z, 2, 2) EMU_SW2(4, z, w, 2, 3)
    EMU_SW2(4, w, x, 3, 0) EMU_SW2(4, w, y, 3, 1) EMU_SW2(4, w, z, 3, 2) EMU_SW2(4, w, w, 3, 3)
    EMU_SW3(4, x, y, z, 0, 1, 2) EMU_SW3(4, y, z, w, 1, 2, 3) EMU_SW3(4, z, y, x, 2, 1, 0)
    EMU_SW3(4, w, z, y, 3, 2, 1)
    swizzle<T, 4, 0, 1, 2, 3> xyzw;
    swizzle<T, 4, 3, 2, 1, 0> wzyx;
    EMU_SW2(4, r, g, 0, 1) EMU_SW3(4, r, g, b, 0, 1, 2)
    swizzle<T, 4, 0, 1, 2, 3> rgba;
  };
};
#undef EMU_SW2
#undef EMU_SW3

template <class T, class X>
constexpr T component(const X& x, int i) {
  if constexpr (vector_like<X>) {
    return T(x.get(i));
  } else {
    (void)i;
    return T(x);
  }
}
}  // namespace emu

template <class T, int N>
struct vec : emu::vec_storage<T, N> {
  using value_type = T;

  vec() = default;
  vec(const vec& o) { *this = o; }
  vec& operator=(const vec& o) {
    for (int i = 0; i < N; ++i) this->e[i] = o.e[i];
    return *this;
  }
  // float4 v = 0.0f; float4(1.0f): every component.
  template <class S>
    requires emu::scalar<S>
  vec(S s) {
    for (int i = 0; i < N; ++i) this->e[i] = T(s);
  }
  // float4(a, b, c, d), float4(float2, float, float), float4(float3, float), ...
  template <class A, class B, class... R>
    requires(emu::vsize<A>() + emu::vsize<B>() + (0 + ... + emu::vsize<R>()) == N)
  vec(const A& a, const B& b, const R&... r) {
    int k = 0;
    auto put = [&](const auto& x) {
      using X = std::remove_cvref_t<decltype(x)>;
      for (int i = 0; i < emu::vsize<X>(); ++i) this->e[k++] = emu::component<T>(x, i);
    };
    put(a);
    put(b);
    (put(r), ...);
  }
  // float4(half4): explicit conversion between element types.
  template <class U>
    requires(!std::is_same_v<U, T>)
  explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; ++i) this->e[i] = T(o.e[i]);
  }
  T get(int i) const { return this->e[i]; }
  T& operator[](int i) { return this->e[i]; }
  const T& operator[](int i) const { return this->e[i]; }

#define EMU_VEC_COMPOUND(op)                                                    \
  template <class X>                                                            \
  vec& operator op##=(const X& x) {                                             \
    for (int i = 0; i < N; ++i) this->e[i] = T(this->e[i] op emu::component<T>(x, i)); \
    return *this;                                                               \
  }
  EMU_VEC_COMPOUND(+)
  EMU_VEC_COMPOUND(-)
  EMU_VEC_COMPOUND(*)
  EMU_VEC_COMPOUND(/)
  EMU_VEC_COMPOUND(%)
  EMU_VEC_COMPOUND(&)
  EMU_VEC_COMPOUND(|)
  EMU_VEC_COMPOUND(^)
  EMU_VEC_COMPOUND(<<)
  EMU_VEC_COMPOUND(>>)
#undef EMU_VEC_COMPOUND
};

template <class T, int S, int... I>
emu::swizzle<T, S, I...>::operator vec<T, int(sizeof...(I))>() const {
  vec<T, int(sizeof...(I))> r;
  int k = 0;
  ((r.e[k++] = e[I]), ...);
  return r;
}
template <class T, int S, int... I>
emu::swizzle<T, S, I...>& emu::swizzle<T, S, I...>::operator=(const vec<T, int(sizeof...(I))>& v) {
  int k = 0;
  ((e[I] = v.e[k++]), ...);
  return *this;
}

namespace emu {
template <class A, class B>
concept vector_operands = vector_like<A> || vector_like<B>;
template <class A, class B>
struct vbin {
  using X = std::conditional_t<vector_like<A>, std::remove_cvref_t<A>, std::remove_cvref_t<B>>;
  using elem = typename vtraits<X>::elem;
  static constexpr int size = vtraits<X>::size;
};
}  // namespace emu

#define EMU_VEC_BINARY(op)                                                                  \
  template <class A, class B>                                                               \
    requires emu::vector_operands<A, B>                                                           \
  auto operator op(const A& a, const B& b) {                                                \
    using T = typename emu::vbin<A, B>::elem;                                               \
    constexpr int N = emu::vbin<A, B>::size;                                                \
    static_assert(emu::vsize<A>() == 1 || emu::vsize<B>() == 1 ||                           \
                  emu::vsize<A>() == emu::vsize<B>(), "vector sizes differ");               \
    vec<T, N> r;                                                                            \
    for (int i = 0; i < N; ++i) r.e[i] = T(emu::component<T>(a, i) op emu::component<T>(b, i)); \
    return r;                                                                               \
  }
#define EMU_VEC_COMPARE(op)                                                                 \
  template <class A, class B>                                                               \
    requires emu::vector_operands<A, B>                                                           \
  auto operator op(const A& a, const B& b) {                                                \
    using T = typename emu::vbin<A, B>::elem;                                               \
    constexpr int N = emu::vbin<A, B>::size;                                                \
    vec<bool, N> r;                                                                         \
    for (int i = 0; i < N; ++i) r.e[i] = emu::component<T>(a, i) op emu::component<T>(b, i); \
    return r;                                                                               \
  }
EMU_VEC_BINARY(+)
EMU_VEC_BINARY(-)
EMU_VEC_BINARY(*)
EMU_VEC_BINARY(/)
EMU_VEC_BINARY(%)
EMU_VEC_BINARY(&)
EMU_VEC_BINARY(|)
EMU_VEC_BINARY(^)
EMU_VEC_BINARY(<<)
EMU_VEC_BINARY(>>)
EMU_VEC_COMPARE(==)
EMU_VEC_COMPARE(!=)
EMU_VEC_COMPARE(<)
EMU_VEC_COMPARE(<=)
EMU_VEC_COMPARE(>)
EMU_VEC_COMPARE(>=)
EMU_VEC_COMPARE(&&)
EMU_VEC_COMPARE(||)
#undef EMU_VEC_BINARY
#undef EMU_VEC_COMPARE

template <class V>
  requires emu::vector_like<V>
auto operator-(const V& v) {
  using T = typename emu::vtraits<V>::elem;
  vec<T, emu::vsize<V>()> r;
  for (int i = 0; i < emu::vsize<V>(); ++i) r.e[i] = T(-v.get(i));
  return r;
}
template <class V>
  requires emu::vector_like<V>
auto operator~(const V& v) {
  using T = typename emu::vtraits<V>::elem;
  vec<T, emu::vsize<V>()> r;
  for (int i = 0; i < emu::vsize<V>(); ++i) r.e[i] = T(~v.get(i));
  return r;
}
template <class V>
  requires emu::vector_like<V>
auto operator!(const V& v) {
  vec<bool, emu::vsize<V>()> r;
  for (int i = 0; i < emu::vsize<V>(); ++i) r.e[i] = !v.get(i);
  return r;
}

#define EMU_VEC_TYPES(T, name) \
  typedef vec<T, 2> name##2;   \
  typedef vec<T, 3> name##3;   \
  typedef vec<T, 4> name##4;
EMU_VEC_TYPES(float, float)
EMU_VEC_TYPES(half, half)
EMU_VEC_TYPES(bfloat, bfloat)
EMU_VEC_TYPES(int, int)
EMU_VEC_TYPES(uint, uint)
EMU_VEC_TYPES(short, short)
EMU_VEC_TYPES(ushort, ushort)
EMU_VEC_TYPES(char, char)
EMU_VEC_TYPES(uchar, uchar)
EMU_VEC_TYPES(long, long)
EMU_VEC_TYPES(ulong, ulong)
EMU_VEC_TYPES(bool, bool)
#undef EMU_VEC_TYPES

// ---- the emulator runtime interface (implemented in runtime.h) ---------------------------

namespace emu {
// The values of every Metal kernel-argument attribute MLX knows for one thread; the generated
// launch function passes the ones the kernel's signature declares.
struct ThreadIds {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, dispatch_threads_per_threadgroup, threads_per_grid;
  uint3 threadgroups_per_grid, grid_size, grid_origin;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup, threads_per_simdgroup;
  uint thread_execution_width, thread_index_in_quadgroup, quadgroup_index_in_threadgroup;
  uint quadgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
};

struct Site {
  const char* file;
  unsigned line;
  unsigned column;
  const char* op;
  static Site at(const char* op, const std::source_location& l) {
    return {l.file_name(), unsigned(l.line()), unsigned(l.column()), op};
  }
  bool operator==(const Site& o) const {
    return line == o.line && column == o.column && std::strcmp(file, o.file) == 0 &&
           std::strcmp(op, o.op) == 0;
  }
};

constexpr int kSimdWidth = 32;
constexpr std::size_t kSlotBytes = 64;  // largest value a SIMD-group function exchanges

// What one lane brings to a SIMD-group function and what it gets back.
struct LaneSlot {
  alignas(16) unsigned char in[kSlotBytes];
  alignas(16) unsigned char out[kSlotBytes];
  uint32_t arg;  // lane index, delta or xor mask of a shuffle
};
// Computes every participating lane's `out` once all live lanes have arrived. `live` has bit i
// set when lane i takes part; slots[i] is null for lanes that do not exist.
using Resolver = void (*)(LaneSlot* const* slots, uint32_t live, const Site& site);

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void simd_collective(const void* in, std::size_t in_size, void* out, std::size_t out_size,
                     uint32_t arg, Resolver resolve, const Site& site);
void threadgroup_barrier(const Site& site);
void* threadgroup_alloc(int id, std::size_t size, std::size_t align);
const char* describe(const Site& site);

template <class T>
T slot_in(const LaneSlot* s) {
  T v;
  std::memcpy(static_cast<void*>(&v), s->in, sizeof(T));
  return v;
}
template <class T>
void slot_out(LaneSlot* s, const T& v) {
  std::memcpy(s->out, static_cast<const void*>(&v), sizeof(T));
}

// One SIMD-group function call: this lane's value in, its result (type R) out.
template <class T, class Op, class R = T>
R collective(const T& v, uint32_t arg, const Site& site) {
  static_assert(sizeof(T) <= kSlotBytes && sizeof(R) <= kSlotBytes,
                "value too large for a SIMD-group function");
  R r;
  simd_collective(&v, sizeof(T), &r, sizeof(R), arg, &Op::template resolve<T>, site);
  return r;
}

// Reductions and scans over the live lanes, in lane order.
template <class F>
struct fold_op {
  template <class T>
  static void resolve(LaneSlot* const* s, uint32_t live, const Site&) {
    bool first = true;
    T acc{};
    for (int i = 0; i < kSimdWidth; ++i) {
      if (!(live >> i & 1u)) continue;
      T v = slot_in<T>(s[i]);
      acc = first ? v : T(F{}(acc, v));
      first = false;
    }
    for (int i = 0; i < kSimdWidth; ++i)
      if (live >> i & 1u) slot_out(s[i], acc);
  }
};
template <class F, bool Inclusive>
struct scan_op {
  template <class T>
  static void resolve(LaneSlot* const* s, uint32_t live, const Site&) {
    T acc = F::template identity<T>();
    for (int i = 0; i < kSimdWidth; ++i) {
      if (!(live >> i & 1u)) continue;
      T v = slot_in<T>(s[i]);
      T next = T(F{}(acc, v));
      slot_out(s[i], Inclusive ? next : acc);
      acc = next;
    }
  }
};

enum class ShuffleKind { index, down, up, xor_mask };
template <ShuffleKind K>
struct shuffle_op {
  template <class T>
  static void resolve(LaneSlot* const* s, uint32_t live, const Site& site) {
    for (int i = 0; i < kSimdWidth; ++i) {
      if (!(live >> i & 1u)) continue;
      const uint32_t a = s[i]->arg;
      long src;
      switch (K) {
        case ShuffleKind::index: src = long(a); break;
        case ShuffleKind::down: src = long(i) + long(a); if (src >= kSimdWidth) src = i; break;
        case ShuffleKind::up: src = long(i) - long(a); if (src < 0) src = i; break;
        case ShuffleKind::xor_mask: src = long(uint32_t(i) ^ a); break;
      }
      if (src < 0 || src >= kSimdWidth)
        fail("%s: lane %d reads lane %ld, which does not exist (a SIMD-group has %d lanes)",
             describe(site), i, src, kSimdWidth);
      if (!(live >> src & 1u))
        fail("%s: lane %d reads lane %ld, which is not active (outside the threadgroup or "
             "already returned)",
             describe(site), i, src);
      slot_out(s[i], slot_in<T>(s[src]));
    }
  }
};
struct broadcast_first_op {
  template <class T>
  static void resolve(LaneSlot* const* s, uint32_t live, const Site&) {
    const T v = slot_in<T>(s[__builtin_ctz(live)]);
    for (int i = 0; i < kSimdWidth; ++i)
      if (live >> i & 1u) slot_out(s[i], v);
  }
};
struct ballot_op {
  template <class T>
  static void resolve(LaneSlot* const* s, uint32_t live, const Site&) {
    uint64_t bits = 0;
    for (int i = 0; i < kSimdWidth; ++i)
      if ((live >> i & 1u) && slot_in<bool>(s[i])) bits |= uint64_t(1) << i;
    const uint64_t r[2] = {bits, uint64_t(live)};
    for (int i = 0; i < kSimdWidth; ++i)
      if (live >> i & 1u) std::memcpy(s[i]->out, r, sizeof r);
  }
};
struct no_op {
  template <class T>
  static void resolve(LaneSlot* const*, uint32_t, const Site&) {}
};
}  // namespace emu

// ---- namespace metal --------------------------------------------------------------------

namespace metal {

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
template <>
struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr bool has_infinity = true;
  static constexpr half min() { return half(6.103515625e-05f); }
  static constexpr half max() { return half(65504.0f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half epsilon() { return half(0.0009765625f); }
  static constexpr half infinity() { return half(__builtin_inff()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
  static constexpr half denorm_min() { return half(5.9604644775390625e-08f); }
};
template <>
struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static constexpr bool has_infinity = true;
  static constexpr bfloat min() { return bfloat::from_bits(0x0080); }
  static constexpr bfloat max() { return bfloat::from_bits(0x7f7f); }
  static constexpr bfloat lowest() { return bfloat::from_bits(0xff7f); }
  static constexpr bfloat epsilon() { return bfloat::from_bits(0x3c00); }
  static constexpr bfloat infinity() { return bfloat::from_bits(0x7f80); }
  static constexpr bfloat quiet_NaN() { return bfloat::from_bits(0x7fc0); }
  static constexpr bfloat denorm_min() { return bfloat::from_bits(0x0001); }
};

template <class To, class From>
To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To t;
  std::memcpy(static_cast<void*>(&t), static_cast<const void*>(&f), sizeof(To));
  return t;
}

// Elementwise application to vectors, shared by every math function below.
template <class V, class F>
auto vmap(const V& v, F f) {
  using T = typename emu::vtraits<V>::elem;
  using R = decltype(f(T{}));
  vec<R, emu::vsize<V>()> r;
  for (int i = 0; i < emu::vsize<V>(); ++i) r.e[i] = f(v.get(i));
  return r;
}
template <class V, class F>
auto vmap2(const V& a, const V& b, F f) {
  using T = typename emu::vtraits<V>::elem;
  vec<T, emu::vsize<V>()> r;
  for (int i = 0; i < emu::vsize<V>(); ++i) r.e[i] = f(a.get(i), b.get(i));
  return r;
}

// One-argument float functions: float, half and bfloat (computed in float, rounded back),
// and vectors of those.
#define EMU_MATH1(name, expr)                                                            \
  inline float name(float x) { return expr; }                                            \
  inline half name(half x) { return half(name(float(x))); }                              \
  inline bfloat name(bfloat x) { return bfloat(name(float(x))); }                        \
  template <class V>                                                                     \
    requires emu::vector_like<V>                                                         \
  auto name(const V& v) {                                                                \
    return vmap(v, [](auto x) { return name(x); });                                      \
  }
EMU_MATH1(exp, std::exp(x))
EMU_MATH1(exp2, std::exp2(x))
EMU_MATH1(exp10, std::pow(10.0f, x))
EMU_MATH1(log, std::log(x))
EMU_MATH1(log2, std::log2(x))
EMU_MATH1(log10, std::log10(x))
EMU_MATH1(sqrt, std::sqrt(x))
EMU_MATH1(rsqrt, 1.0f / std::sqrt(x))
EMU_MATH1(sin, std::sin(x))
EMU_MATH1(cos, std::cos(x))
EMU_MATH1(tan, std::tan(x))
EMU_MATH1(asin, std::asin(x))
EMU_MATH1(acos, std::acos(x))
EMU_MATH1(atan, std::atan(x))
EMU_MATH1(sinh, std::sinh(x))
EMU_MATH1(cosh, std::cosh(x))
EMU_MATH1(tanh, std::tanh(x))
EMU_MATH1(asinh, std::asinh(x))
EMU_MATH1(acosh, std::acosh(x))
EMU_MATH1(atanh, std::atanh(x))
EMU_MATH1(floor, std::floor(x))
EMU_MATH1(ceil, std::ceil(x))
EMU_MATH1(round, std::round(x))
EMU_MATH1(rint, std::rint(x))
EMU_MATH1(trunc, std::trunc(x))
EMU_MATH1(fract, x - std::floor(x))
EMU_MATH1(fabs, std::fabs(x))
EMU_MATH1(sign, (x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : x == x ? 0.0f : x))
EMU_MATH1(saturate, std::fmin(std::fmax(x, 0.0f), 1.0f))
#undef EMU_MATH1

// Two-argument float functions.
#define EMU_MATH2(name, expr)                                                            \
  inline float name(float x, float y) { return expr; }                                   \
  inline half name(half x, half y) { return half(name(float(x), float(y))); }            \
  inline bfloat name(bfloat x, bfloat y) { return bfloat(name(float(x), float(y))); }    \
  template <class V>                                                                     \
    requires emu::vector_like<V>                                                         \
  auto name(const V& a, const V& b) {                                                    \
    return vmap2(a, b, [](auto x, auto y) { return name(x, y); });                       \
  }
EMU_MATH2(pow, std::pow(x, y))
EMU_MATH2(powr, std::pow(x, y))
EMU_MATH2(atan2, std::atan2(x, y))
EMU_MATH2(fmod, std::fmod(x, y))
EMU_MATH2(fmax, std::fmax(x, y))
EMU_MATH2(fmin, std::fmin(x, y))
EMU_MATH2(copysign, std::copysign(x, y))
EMU_MATH2(step, (y < x ? 0.0f : 1.0f))
#undef EMU_MATH2

inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline half fma(half a, half b, half c) { return half(std::fma(float(a), float(b), float(c))); }
inline bfloat fma(bfloat a, bfloat b, bfloat c) { return bfloat(std::fma(float(a), float(b), float(c))); }
inline float mix(float x, float y, float a) { return x + (y - x) * a; }
inline half mix(half x, half y, half a) { return half(mix(float(x), float(y), float(a))); }

// min / max / clamp / abs: floats with fmin/fmax semantics (a NaN operand is ignored).
#define EMU_MINMAX_FLOAT(T)                                                              \
  inline T max(T a, T b) { return T(std::fmax(float(a), float(b))); }                    \
  inline T min(T a, T b) { return T(std::fmin(float(a), float(b))); }                    \
  inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }                        \
  inline T abs(T x) { return T(std::fabs(float(x))); }
EMU_MINMAX_FLOAT(float)
EMU_MINMAX_FLOAT(half)
EMU_MINMAX_FLOAT(bfloat)
#undef EMU_MINMAX_FLOAT
typedef signed char schar;
#define EMU_MINMAX_INT(T)                                                                \
  inline T max(T a, T b) { return a < b ? b : a; }                                       \
  inline T min(T a, T b) { return b < a ? b : a; }                                       \
  inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }                        \
  inline T abs(T x) { return x < 0 ? T(-x) : x; }                                        \
  inline T popcount(T x) { return T(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)x)); } \
  inline T clz(T x) {                                                                    \
    using U = std::make_unsigned_t<T>;                                                   \
    return x == 0 ? T(8 * sizeof(T))                                                     \
                  : T(__builtin_clzll((unsigned long long)(U)x) - 8 * (8 - sizeof(T)));  \
  }                                                                                      \
  inline T ctz(T x) { return x == 0 ? T(8 * sizeof(T)) : T(__builtin_ctzll((unsigned long long)x)); }
EMU_MINMAX_INT(char)
EMU_MINMAX_INT(schar)
EMU_MINMAX_INT(uchar)
EMU_MINMAX_INT(short)
EMU_MINMAX_INT(ushort)
EMU_MINMAX_INT(int)
EMU_MINMAX_INT(uint)
EMU_MINMAX_INT(long)
EMU_MINMAX_INT(ulong)
#undef EMU_MINMAX_INT
template <class V>
  requires emu::vector_like<V>
auto max(const V& a, const V& b) { return vmap2(a, b, [](auto x, auto y) { return max(x, y); }); }
template <class V>
  requires emu::vector_like<V>
auto min(const V& a, const V& b) { return vmap2(a, b, [](auto x, auto y) { return min(x, y); }); }
template <class V>
  requires emu::vector_like<V>
auto abs(const V& v) { return vmap(v, [](auto x) { return abs(x); }); }
template <class V, class S>
  requires emu::vector_like<V>
auto clamp(const V& v, const S& lo, const S& hi) {
  using T = typename emu::vtraits<V>::elem;
  vec<T, emu::vsize<V>()> r;
  for (int i = 0; i < emu::vsize<V>(); ++i)
    r.e[i] = clamp(v.get(i), emu::component<T>(lo, i), emu::component<T>(hi, i));
  return r;
}

template <class T>
  requires emu::scalar<T>
bool isnan(T x) { return std::isnan(float(x)); }
template <class T>
  requires emu::scalar<T>
bool isinf(T x) { return std::isinf(float(x)); }
template <class T>
  requires emu::scalar<T>
bool isfinite(T x) { return std::isfinite(float(x)); }
template <class T>
  requires emu::scalar<T>
bool signbit(T x) { return std::signbit(float(x)); }
template <class V>
  requires emu::vector_like<V>
auto isnan(const V& v) { return vmap(v, [](auto x) { return isnan(x); }); }
template <class V>
  requires emu::vector_like<V>
auto isinf(const V& v) { return vmap(v, [](auto x) { return isinf(x); }); }

// select(a, b, c): c ? b : a, per component for vectors.
template <class T>
  requires emu::scalar<T>
T select(T a, T b, bool c) { return c ? b : a; }
template <class V, class C>
  requires emu::vector_like<V>
auto select(const V& a, const V& b, const C& c) {
  using T = typename emu::vtraits<V>::elem;
  vec<T, emu::vsize<V>()> r;
  for (int i = 0; i < emu::vsize<V>(); ++i) r.e[i] = emu::component<bool>(c, i) ? b.get(i) : a.get(i);
  return r;
}

template <class V>
  requires emu::vector_like<V>
auto dot(const V& a, const V& b) {
  using T = typename emu::vtraits<V>::elem;
  T s = T(a.get(0) * b.get(0));
  for (int i = 1; i < emu::vsize<V>(); ++i) s = T(s + a.get(i) * b.get(i));
  return s;
}
template <class V>
  requires emu::vector_like<V>
auto length(const V& v) { return sqrt(dot(v, v)); }
template <class V>
  requires emu::vector_like<V>
auto normalize(const V& v) { return v * rsqrt(dot(v, v)); }
template <class V>
  requires emu::vector_like<V>
bool all(const V& v) {
  for (int i = 0; i < emu::vsize<V>(); ++i)
    if (!v.get(i)) return false;
  return true;
}
template <class V>
  requires emu::vector_like<V>
bool any(const V& v) {
  for (int i = 0; i < emu::vsize<V>(); ++i)
    if (v.get(i)) return true;
  return false;
}
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }

// metal::fast and metal::precise: the same functions (precision differences are not modelled).
#define EMU_MATH_NAMES                                                                   \
  using metal::exp; using metal::exp2; using metal::exp10; using metal::log;            \
  using metal::log2; using metal::log10; using metal::sqrt; using metal::rsqrt;         \
  using metal::sin; using metal::cos; using metal::tan; using metal::asin;              \
  using metal::acos; using metal::atan; using metal::sinh; using metal::cosh;           \
  using metal::tanh; using metal::asinh; using metal::acosh; using metal::atanh;        \
  using metal::floor; using metal::ceil; using metal::round; using metal::rint;         \
  using metal::trunc; using metal::fract; using metal::fabs; using metal::sign;         \
  using metal::saturate; using metal::pow; using metal::powr; using metal::atan2;       \
  using metal::fmod; using metal::fmax; using metal::fmin; using metal::copysign;       \
  using metal::step; using metal::fma; using metal::mix; using metal::max;              \
  using metal::min; using metal::clamp; using metal::abs; using metal::isnan;           \
  using metal::isinf; using metal::isfinite; using metal::signbit; using metal::select; \
  using metal::dot; using metal::length; using metal::normalize; using metal::all;      \
  using metal::any; using metal::popcount; using metal::clz; using metal::ctz;
namespace fast {
EMU_MATH_NAMES
}
namespace precise {
EMU_MATH_NAMES
}

// ---- atomics ----------------------------------------------------------------------------

enum memory_order { memory_order_relaxed, memory_order_seq_cst };
inline constexpr std::memory_order emu_order(memory_order o) {
  return o == memory_order_relaxed ? std::memory_order_relaxed : std::memory_order_seq_cst;
}

template <class T>
struct atomic {
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, uint> || std::is_same_v<T, bool> ||
                    std::is_same_v<T, float> || std::is_same_v<T, ulong> || std::is_same_v<T, long>,
                "Metal has atomic<T> only for int, uint, bool, float and (u)long");
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;

template <class T>
std::atomic_ref<T> emu_ref(volatile atomic<T>* a) {
  return std::atomic_ref<T>(const_cast<atomic<T>*>(a)->value);
}
template <class T, class U>
void atomic_store_explicit(volatile atomic<T>* a, U v, memory_order o) { emu_ref(a).store(T(v), emu_order(o)); }
template <class T>
T atomic_load_explicit(volatile atomic<T>* a, memory_order o) { return emu_ref(a).load(emu_order(o)); }
template <class T, class U>
T atomic_exchange_explicit(volatile atomic<T>* a, U v, memory_order o) {
  return emu_ref(a).exchange(T(v), emu_order(o));
}
template <class T, class U>
bool atomic_compare_exchange_weak_explicit(volatile atomic<T>* a, T* expected, U desired,
                                           memory_order s, memory_order f) {
  return emu_ref(a).compare_exchange_strong(*expected, T(desired), emu_order(s), emu_order(f));
}
template <class T, class U>
T atomic_fetch_add_explicit(volatile atomic<T>* a, U v, memory_order o) {
  return emu_ref(a).fetch_add(T(v), emu_order(o));
}
template <class T, class U>
T atomic_fetch_sub_explicit(volatile atomic<T>* a, U v, memory_order o) {
  return emu_ref(a).fetch_sub(T(v), emu_order(o));
}
template <class T, class U>
T atomic_fetch_and_explicit(volatile atomic<T>* a, U v, memory_order o) {
  return emu_ref(a).fetch_and(T(v), emu_order(o));
}
template <class T, class U>
T atomic_fetch_or_explicit(volatile atomic<T>* a, U v, memory_order o) {
  return emu_ref(a).fetch_or(T(v), emu_order(o));
}
template <class T, class U>
T atomic_fetch_xor_explicit(volatile atomic<T>* a, U v, memory_order o) {
  return emu_ref(a).fetch_xor(T(v), emu_order(o));
}
template <class T, class U>
T atomic_fetch_max_explicit(volatile atomic<T>* a, U v, memory_order o) {
  auto r = emu_ref(a);
  T cur = r.load(emu_order(o));
  while (cur < T(v) && !r.compare_exchange_weak(cur, T(v), emu_order(o))) {
  }
  return cur;
}
template <class T, class U>
T atomic_fetch_min_explicit(volatile atomic<T>* a, U v, memory_order o) {
  auto r = emu_ref(a);
  T cur = r.load(emu_order(o));
  while (T(v) < cur && !r.compare_exchange_weak(cur, T(v), emu_order(o))) {
  }
  return cur;
}

// ---- barriers and SIMD-group functions --------------------------------------------------

enum class mem_flags : unsigned {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }

using emu_loc = std::source_location;

inline void threadgroup_barrier(mem_flags, emu_loc l = emu_loc::current()) {
  emu::threadgroup_barrier(emu::Site::at("threadgroup_barrier", l));
}
inline void simdgroup_barrier(mem_flags, emu_loc l = emu_loc::current()) {
  emu::collective<char, emu::no_op>(0, 0, emu::Site::at("simdgroup_barrier", l));
}

namespace emu_ops {
struct plus { template <class T> static T identity() { return T(0); } auto operator()(auto a, auto b) const { return a + b; } };
struct times { template <class T> static T identity() { return T(1); } auto operator()(auto a, auto b) const { return a * b; } };
struct maximum { auto operator()(auto a, auto b) const { return max(a, b); } };
struct minimum { auto operator()(auto a, auto b) const { return min(a, b); } };
struct bit_and { auto operator()(auto a, auto b) const { return a & b; } };
struct bit_or { auto operator()(auto a, auto b) const { return a | b; } };
struct bit_xor { auto operator()(auto a, auto b) const { return a ^ b; } };
}  // namespace emu_ops

#define EMU_SIMD_FOLD(name, F)                                                            \
  template <class T>                                                                      \
  T name(T v, emu_loc l = emu_loc::current()) {                                           \
    return emu::collective<T, emu::fold_op<emu_ops::F>>(v, 0, emu::Site::at(#name, l));   \
  }
EMU_SIMD_FOLD(simd_sum, plus)
EMU_SIMD_FOLD(simd_product, times)
EMU_SIMD_FOLD(simd_max, maximum)
EMU_SIMD_FOLD(simd_min, minimum)
EMU_SIMD_FOLD(simd_and, bit_and)
EMU_SIMD_FOLD(simd_or, bit_or)
EMU_SIMD_FOLD(simd_xor, bit_xor)
#undef EMU_SIMD_FOLD
#define EMU_SIMD_SCAN(name, F, inclusive)                                                 \
  template <class T>                                                                      \
  T name(T v, emu_loc l = emu_loc::current()) {                                           \
    return emu::collective<T, emu::scan_op<emu_ops::F, inclusive>>(v, 0, emu::Site::at(#name, l)); \
  }
EMU_SIMD_SCAN(simd_prefix_inclusive_sum, plus, true)
EMU_SIMD_SCAN(simd_prefix_exclusive_sum, plus, false)
EMU_SIMD_SCAN(simd_prefix_inclusive_product, times, true)
EMU_SIMD_SCAN(simd_prefix_exclusive_product, times, false)
#undef EMU_SIMD_SCAN
#define EMU_SIMD_SHUFFLE(name, kind)                                                      \
  template <class T>                                                                      \
  T name(T v, uint a, emu_loc l = emu_loc::current()) {                                   \
    return emu::collective<T, emu::shuffle_op<emu::ShuffleKind::kind>>(v, a, emu::Site::at(#name, l)); \
  }
EMU_SIMD_SHUFFLE(simd_shuffle, index)
EMU_SIMD_SHUFFLE(simd_broadcast, index)
EMU_SIMD_SHUFFLE(simd_shuffle_down, down)
EMU_SIMD_SHUFFLE(simd_shuffle_up, up)
EMU_SIMD_SHUFFLE(simd_shuffle_xor, xor_mask)
#undef EMU_SIMD_SHUFFLE
template <class T>
T simd_broadcast_first(T v, emu_loc l = emu_loc::current()) {
  return emu::collective<T, emu::broadcast_first_op>(v, 0, emu::Site::at("simd_broadcast_first", l));
}

// simd_ballot's result: the set lanes, and which lanes were active.
struct simd_vote {
  typedef uint64_t vote_t;
  uint64_t bits;
  uint64_t active;
  explicit operator vote_t() const { return bits; }
  bool all() const { return bits == active; }
  bool any() const { return bits != 0; }
};
inline simd_vote simd_ballot(bool b, emu_loc l = emu_loc::current()) {
  return emu::collective<bool, emu::ballot_op, simd_vote>(b, 0, emu::Site::at("simd_ballot", l));
}
inline bool simd_any(bool b, emu_loc l = emu_loc::current()) {
  return emu::collective<bool, emu::fold_op<emu_ops::bit_or>>(b, 0, emu::Site::at("simd_any", l));
}
inline bool simd_all(bool b, emu_loc l = emu_loc::current()) {
  return emu::collective<bool, emu::fold_op<emu_ops::bit_and>>(b, 0, emu::Site::at("simd_all", l));
}

}  // namespace metal

// ---- the part of MLX's Metal utils header that MLX prepends to custom kernels ------------

namespace emu_kernel {
using namespace metal;
// Names found in metal:: first, before the C library's ::abs, ::exp, ...
EMU_MATH_NAMES
using metal::threadgroup_barrier;
using metal::simdgroup_barrier;

typedef half float16_t;
typedef bfloat bfloat16_t;

template <class T>
struct Limits {
  static constexpr T max = metal::numeric_limits<T>::max();
  static constexpr T min = metal::numeric_limits<T>::min();
  static constexpr T finite_max = metal::numeric_limits<T>::max();
  static constexpr T finite_min = metal::numeric_limits<T>::min();
};
#define EMU_FLOAT_LIMITS(T)                                                       \
  template <>                                                                     \
  struct Limits<T> {                                                              \
    static constexpr T max = metal::numeric_limits<T>::infinity();                \
    static constexpr T min = -metal::numeric_limits<T>::infinity();               \
    static constexpr T finite_max = metal::numeric_limits<T>::max();              \
    static constexpr T finite_min = -metal::numeric_limits<T>::max();             \
  };
EMU_FLOAT_LIMITS(float)
EMU_FLOAT_LIMITS(half)
EMU_FLOAT_LIMITS(bfloat)
#undef EMU_FLOAT_LIMITS

template <class T, class U>
inline T ceildiv(T n, U m) { return (n + m - 1) / m; }

template <class IdxT = int64_t>
IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <class IdxT = int64_t>
IdxT elem_to_loc(uint3 elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}
template <class IdxT = int64_t>
IdxT elem_to_loc_1(uint elem, const int64_t& stride) { return elem * IdxT(stride); }
template <class IdxT = int64_t>
IdxT elem_to_loc_2(uint2 elem, const int64_t strides[2]) {
  return elem.x * IdxT(strides[1]) + elem.y * IdxT(strides[0]);
}
template <class IdxT = int64_t>
IdxT elem_to_loc_3(uint3 elem, const int64_t strides[3]) {
  return elem.x * IdxT(strides[2]) + elem.y * IdxT(strides[1]) + elem.z * IdxT(strides[0]);
}

inline float log1p(float x) {
  const float xp1 = 1.0f + x;
  if (xp1 == Limits<float>::max) return Limits<float>::max;
  if (xp1 == 1.0f) return x;
  return x * (metal::log(xp1) / (xp1 - 1.0f));
}
inline bfloat log1p(bfloat x) { return bfloat(log1p(float(x))); }
}  // namespace emu_kernel

// Metal's address-space and function qualifiers, defined away (after every system header).
#define device
#define constant
#define thread
#define threadgroup
#define METAL_FUNC inline
#define MLX_MTL_PRAGMA_UNROLL
