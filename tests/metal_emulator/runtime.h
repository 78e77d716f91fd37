// The emulated GPU: runs one kernel launch described by a spec file, one threadgroup at a time,
// every thread of the threadgroup a ucontext fiber. Included at the end of the generated
// translation unit, after `emu_kernel::emu_launch` and `emu_kernel::emu_num_buffers`.
//
// A fiber runs until it reaches threadgroup_barrier or a SIMD-group function; the scheduler
// then resumes the other ready fibers (in the order the schedule gives), and once none is
// ready releases a SIMD-group function whose live lanes all wait at the same call site, or
// the barrier when every thread of the threadgroup waits at the same one. Anything else
// (lanes at different sites, a thread that returned while the others wait at a barrier) is
// a kernel error, reported with the source lines and exit status 3.
//
// Spec file (text, one item per line):
//   grid X Y Z / threadgroup X Y Z / schedule inorder|reverse|random SEED
//   buffer NBYTES in|out PATH    (one per [[buffer(i)]], in order; `out` is written back)
#pragma once

namespace emu {

#if defined(__SANITIZE_THREAD__)
// The scheduler's own bookkeeping is invisible to ThreadSanitizer; kernel code is not.
struct TsanIgnore {
  TsanIgnore() { __tsan_ignore_thread_begin(); }
  ~TsanIgnore() { __tsan_ignore_thread_end(); }
};
#define EMU_TSAN_IGNORE ::emu::TsanIgnore emu_tsan_ignore_
#define EMU_TSAN_RELEASE(p) __tsan_release(p)
#define EMU_TSAN_ACQUIRE(p) __tsan_acquire(p)
#else
#define EMU_TSAN_IGNORE
#define EMU_TSAN_RELEASE(p)
#define EMU_TSAN_ACQUIRE(p)
#endif

#if defined(__SANITIZE_ADDRESS__)
constexpr std::size_t kStackBytes = std::size_t(512) << 10;
#else
constexpr std::size_t kStackBytes = std::size_t(256) << 10;
#endif
constexpr std::size_t kGuardBytes = 4096;  // a PROT_NONE page below every fiber stack
constexpr int kMaxThreadsPerThreadgroup = 1024;
constexpr std::size_t kMaxThreadgroupMemory = 32768;

enum class State { ready, at_barrier, at_collective, done };

struct Fiber {
  ucontext_t context;
  char* stack;
  ThreadIds ids;
  State state;
  Site site;  // where it waits
  LaneSlot slot;
  std::size_t in_size, out_size;
  Resolver resolver;
  unsigned epoch;  // barrier / SIMD-group epoch it waits in (ThreadSanitizer sync address)
  void* tsan_fiber;
  void* asan_fake_stack;
  char name[96];
};

struct Launch {
  unsigned grid[3], tg[3], groups[3];
  enum { inorder, reverse, random } schedule;
  uint64_t rng;
  std::vector<void*> buffers;
  std::vector<std::size_t> sizes;
  std::vector<bool> writeback;
  std::vector<char*> paths;
};

// State of the threadgroup being run.
struct Group {
  uint3 position;
  unsigned nthreads;
  Fiber* fibers;
  std::vector<void*> memory;  // one allocation per `threadgroup` declaration
  std::size_t memory_bytes;
  unsigned barrier_epoch;
  unsigned simd_epoch[kMaxThreadsPerThreadgroup / kSimdWidth];
  char* sync;  // ThreadSanitizer sync addresses: 2 for barriers, then 2 per SIMD-group
  int resolving_simdgroup;
};

static Launch g_launch;
static Group g_group;
static Fiber* g_current;
static ucontext_t g_scheduler;
static void* g_scheduler_tsan;
static const void* g_scheduler_stack;
static std::size_t g_scheduler_stack_size;
static void* g_scheduler_fake_stack;

static char* g_stacks;
static std::size_t g_stacks_bytes;

void fail(const char* fmt, ...) {
  std::fflush(stdout);
  std::fputs("metal-emulator: error: ", stderr);
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fputc('\n', stderr);
  std::fflush(stderr);
  _exit(3);
}

static const char* where(const Site& s) {
  static char buf[4][512];
  static int k;
  char* b = buf[k++ & 3];
  std::snprintf(b, sizeof buf[0], "%s at %s:%u:%u", s.op, s.file, s.line, s.column);
  return b;
}
static const char* thread_name(const Fiber& f) {
  static char buf[4][128];
  static int k;
  char* b = buf[k++ & 3];
  const uint3& p = f.ids.thread_position_in_threadgroup;
  std::snprintf(b, sizeof buf[0], "thread (%u,%u,%u) (simdgroup %u lane %u)", p.x, p.y, p.z,
                f.ids.simdgroup_index_in_threadgroup, f.ids.thread_index_in_simdgroup);
  return b;
}
static const char* group_name() {
  static char b[64];
  std::snprintf(b, sizeof b, "threadgroup (%u,%u,%u)", g_group.position.x, g_group.position.y,
                g_group.position.z);
  return b;
}
const char* describe(const Site& site) {
  static char b[768];
  std::snprintf(b, sizeof b, "%s in %s, simdgroup %d", where(site), group_name(),
                g_group.resolving_simdgroup);
  return b;
}

// ---- fiber switching ----------------------------------------------------------------------

static void resume(Fiber* f) {
  g_current = f;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&g_scheduler_fake_stack, f->stack + kGuardBytes,
                                 kStackBytes - kGuardBytes);
#endif
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(f->tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&g_scheduler, &f->context);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(g_scheduler_fake_stack, nullptr, nullptr);
#endif
  g_current = nullptr;
}

static void yield_to_scheduler(Fiber* f, bool finished) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(finished ? nullptr : &f->asan_fake_stack, g_scheduler_stack,
                                 g_scheduler_stack_size);
#else
  (void)finished;
#endif
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(g_scheduler_tsan, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&f->context, &g_scheduler);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
}

static void fiber_main() {
  Fiber* f = g_current;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
  void* buffers[emu_kernel::emu_num_buffers];  // copies: the scheduler's memory stays its own
  ThreadIds ids;
  {
    EMU_TSAN_IGNORE;
    std::copy_n(g_launch.buffers.data(), emu_kernel::emu_num_buffers, buffers);
    ids = f->ids;
  }
  emu_kernel::emu_launch(buffers, ids);
  {
    EMU_TSAN_IGNORE;
    f->state = State::done;
  }
  yield_to_scheduler(f, true);
  fail("internal: a finished fiber was resumed");
}

// ---- what kernel code calls ---------------------------------------------------------------

void threadgroup_barrier(const Site& site) {
  Fiber* f = g_current;
  unsigned epoch;
  {
    EMU_TSAN_IGNORE;
    f->state = State::at_barrier;
    f->site = site;
    epoch = g_group.barrier_epoch;
    f->epoch = epoch;
  }
  EMU_TSAN_RELEASE(g_group.sync + (epoch & 1));
  yield_to_scheduler(f, false);
  EMU_TSAN_ACQUIRE(g_group.sync + (epoch & 1));
}

void simd_collective(const void* in, std::size_t in_size, void* out, std::size_t out_size,
                     uint32_t arg, Resolver resolve, const Site& site) {
  Fiber* f = g_current;
  const unsigned sg = f->ids.simdgroup_index_in_threadgroup;
  char* sync;
  {
    EMU_TSAN_IGNORE;
    f->state = State::at_collective;
    f->site = site;
    std::memcpy(f->slot.in, in, in_size);
    f->slot.arg = arg;
    f->in_size = in_size;
    f->out_size = out_size;
    f->resolver = resolve;
    f->epoch = g_group.simd_epoch[sg];
    sync = g_group.sync + 2 + 2 * sg + (f->epoch & 1);
  }
  EMU_TSAN_RELEASE(sync);
  yield_to_scheduler(f, false);
  EMU_TSAN_ACQUIRE(sync);
  EMU_TSAN_IGNORE;
  std::memcpy(out, f->slot.out, out_size);
}

void* threadgroup_alloc(int id, std::size_t size, std::size_t align) {
  EMU_TSAN_IGNORE;
  void*& p = g_group.memory.at(std::size_t(id));
  if (!p) {
    g_group.memory_bytes += size;
    if (g_group.memory_bytes > kMaxThreadgroupMemory)
      fail("%s uses %zu bytes of threadgroup memory; Metal allows %zu", group_name(),
           g_group.memory_bytes, kMaxThreadgroupMemory);
    if (posix_memalign(&p, align < 16 ? 16 : align, size ? size : 1) != 0)
      fail("out of memory for threadgroup memory");
    std::memset(p, 0xff, size);  // poison: NaN for floats, -1 for integers
  }
  return p;
}

// ---- the scheduler ------------------------------------------------------------------------

static uint64_t next_random() {
  uint64_t& x = g_launch.rng;  // xorshift64*
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  return x * 0x2545F4914F6CDD1DULL;
}

template <class T>
static void put_in_order(std::vector<T>& v) {
  switch (g_launch.schedule) {
    case Launch::inorder: break;
    case Launch::reverse:
      for (std::size_t i = 0, j = v.size(); i + 1 < j; ++i, --j) std::swap(v[i], v[j - 1]);
      break;
    case Launch::random:
      for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random() % i]);
      break;
  }
}

static void allocate_stacks(unsigned n) {
  g_stacks_bytes = std::size_t(n) * kStackBytes;
  void* p = mmap(nullptr, g_stacks_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fail("cannot map %zu bytes of fiber stacks", g_stacks_bytes);
  g_stacks = static_cast<char*>(p);
  for (unsigned i = 0; i < n; ++i)  // a stack overflow faults instead of corrupting
    mprotect(g_stacks + std::size_t(i) * kStackBytes, kGuardBytes, PROT_NONE);
}

static void start_fiber(Fiber& f, unsigned index) {
  f.stack = g_stacks + std::size_t(index) * kStackBytes;
#if defined(__SANITIZE_ADDRESS__)
  __asan_unpoison_memory_region(f.stack + kGuardBytes, kStackBytes - kGuardBytes);
#endif
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack + kGuardBytes;
  f.context.uc_stack.ss_size = kStackBytes - kGuardBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
  f.state = State::ready;
  f.asan_fake_stack = nullptr;
#if defined(__SANITIZE_THREAD__)
  f.tsan_fiber = __tsan_create_fiber(0);
  const uint3& p = f.ids.thread_position_in_grid;
  std::snprintf(f.name, sizeof f.name, "GPU thread (%u,%u,%u) of %s", p.x, p.y, p.z, group_name());
  __tsan_set_fiber_name(f.tsan_fiber, f.name);
#endif
}

static void finish_fiber(Fiber& f) {
#if defined(__SANITIZE_THREAD__)
  __tsan_destroy_fiber(f.tsan_fiber);
#else
  (void)f;
#endif
}

static bool same_wait(const Fiber& a, const Fiber& b) {
  return a.site == b.site && a.resolver == b.resolver && a.in_size == b.in_size &&
         a.out_size == b.out_size;
}

// Releases every SIMD-group whose live lanes all wait at one SIMD-group function; true if any.
static bool release_collectives() {
  Group& g = g_group;
  bool progressed = false;
  for (unsigned first = 0; first < g.nthreads; first += kSimdWidth) {
    const unsigned sg = first / kSimdWidth;
    const unsigned last = std::min(g.nthreads, first + kSimdWidth);
    uint32_t live = 0;
    Fiber* waiting = nullptr;
    bool all_waiting = true;
    for (unsigned i = first; i < last; ++i) {
      Fiber& f = g.fibers[i];
      if (f.state == State::done) continue;
      live |= 1u << (i - first);
      if (f.state != State::at_collective) {
        all_waiting = false;
        continue;
      }
      if (!waiting) {
        waiting = &f;
      } else if (!same_wait(*waiting, f)) {
        fail("divergent SIMD-group functions in %s: %s waits at %s but %s waits at %s",
             group_name(), thread_name(*waiting), where(waiting->site), thread_name(f),
             where(f.site));
      }
    }
    if (!live || !all_waiting) continue;
    LaneSlot* slots[kSimdWidth] = {};
    for (unsigned i = first; i < last; ++i) slots[i - first] = &g.fibers[i].slot;
    g.resolving_simdgroup = int(sg);
    waiting->resolver(slots, live, waiting->site);
    g.simd_epoch[sg]++;
    for (unsigned i = first; i < last; ++i)
      if (g.fibers[i].state == State::at_collective) g.fibers[i].state = State::ready;
    progressed = true;
  }
  return progressed;
}

// Called when no fiber is ready and no SIMD-group function can be released: either every
// live thread waits at the same barrier (release it), or the kernel is wrong.
static bool release_barrier() {
  Group& g = g_group;
  Fiber* at_barrier = nullptr;
  Fiber* returned = nullptr;
  for (unsigned i = 0; i < g.nthreads; ++i) {
    Fiber& f = g.fibers[i];
    if (f.state == State::done) {
      if (!returned) returned = &f;
    } else if (f.state == State::at_barrier) {
      if (!at_barrier) at_barrier = &f;
    }
  }
  if (!at_barrier) {
    for (unsigned i = 0; i < g.nthreads; ++i)
      if (g.fibers[i].state == State::at_collective) {
        const Fiber& f = g.fibers[i];
        fail("divergent control flow in %s: %s waits at %s while a lane of its SIMD-group has "
             "not reached it",
             group_name(), thread_name(f), where(f.site));
      }
    return false;  // every thread has finished
  }
  for (unsigned i = 0; i < g.nthreads; ++i) {
    const Fiber& f = g.fibers[i];
    if (f.state == State::at_collective) {
      fail("divergent control flow in %s: %s waits at %s while %s waits at %s", group_name(),
           thread_name(f), where(f.site), thread_name(*at_barrier), where(at_barrier->site));
    }
    if (f.state == State::at_barrier && !(f.site == at_barrier->site)) {
      fail("divergent threadgroup_barrier in %s: %s waits at %s but %s waits at %s",
           group_name(), thread_name(*at_barrier), where(at_barrier->site), thread_name(f),
           where(f.site));
    }
  }
  if (returned) {
    fail("%s: %s returned while other threads wait at %s (every thread of a threadgroup must "
         "reach each threadgroup_barrier)",
         group_name(), thread_name(*returned), where(at_barrier->site));
  }
  g.barrier_epoch++;
  for (unsigned i = 0; i < g.nthreads; ++i) g.fibers[i].state = State::ready;
  return true;
}

static void run_group(std::vector<unsigned>& order) {
  Group& g = g_group;
  for (;;) {
    order.clear();
    for (unsigned i = 0; i < g.nthreads; ++i)
      if (g.fibers[i].state == State::ready) order.push_back(i);
    if (!order.empty()) {
      put_in_order(order);
      for (unsigned i : order) resume(&g.fibers[i]);
      continue;
    }
    g.resolving_simdgroup = -1;
    if (release_collectives()) continue;
    if (!release_barrier()) return;
  }
}

static void set_ids(ThreadIds& t, const unsigned gpos[3], const unsigned actual[3], unsigned lx,
                    unsigned ly, unsigned lz) {
  const Launch& L = g_launch;
  const unsigned n = actual[0] * actual[1] * actual[2];
  const unsigned dispatched = L.tg[0] * L.tg[1] * L.tg[2];
  const unsigned index = lx + actual[0] * (ly + actual[1] * lz);
  t.thread_position_in_threadgroup = uint3(lx, ly, lz);
  t.threadgroup_position_in_grid = uint3(gpos[0], gpos[1], gpos[2]);
  t.thread_position_in_grid =
      uint3(gpos[0] * L.tg[0] + lx, gpos[1] * L.tg[1] + ly, gpos[2] * L.tg[2] + lz);
  t.threads_per_threadgroup = uint3(actual[0], actual[1], actual[2]);
  t.dispatch_threads_per_threadgroup = uint3(L.tg[0], L.tg[1], L.tg[2]);
  t.threads_per_grid = uint3(L.grid[0], L.grid[1], L.grid[2]);
  t.grid_size = t.threads_per_grid;
  t.grid_origin = uint3(0u);
  t.threadgroups_per_grid = uint3(L.groups[0], L.groups[1], L.groups[2]);
  t.thread_index_in_threadgroup = index;
  t.thread_index_in_simdgroup = index % kSimdWidth;
  t.simdgroup_index_in_threadgroup = index / kSimdWidth;
  t.simdgroups_per_threadgroup = (n + kSimdWidth - 1) / kSimdWidth;
  t.dispatch_simdgroups_per_threadgroup = (dispatched + kSimdWidth - 1) / kSimdWidth;
  t.threads_per_simdgroup = kSimdWidth;
  t.thread_execution_width = kSimdWidth;
  t.thread_index_in_quadgroup = index % 4;
  t.quadgroup_index_in_threadgroup = index / 4;
  t.quadgroups_per_threadgroup = (n + 3) / 4;
  t.dispatch_quadgroups_per_threadgroup = (dispatched + 3) / 4;
}

static void run_grid() {
  Launch& L = g_launch;
  Group& g = g_group;
  const unsigned tg_threads = L.tg[0] * L.tg[1] * L.tg[2];
  if (tg_threads > unsigned(kMaxThreadsPerThreadgroup))
    fail("threadgroup of %u threads; Metal allows at most %d", tg_threads, kMaxThreadsPerThreadgroup);
  std::vector<Fiber> fibers(tg_threads);
  std::vector<unsigned> groups(std::size_t(L.groups[0]) * L.groups[1] * L.groups[2]);
  for (std::size_t i = 0; i < groups.size(); ++i) groups[i] = unsigned(i);
  put_in_order(groups);
  std::vector<unsigned> order;
  order.reserve(tg_threads);
  allocate_stacks(tg_threads);
  for (unsigned linear : groups) {
    const unsigned gpos[3] = {linear % L.groups[0], linear / L.groups[0] % L.groups[1],
                              linear / (L.groups[0] * L.groups[1])};
    unsigned actual[3];
    for (int d = 0; d < 3; ++d) actual[d] = std::min(L.tg[d], L.grid[d] - gpos[d] * L.tg[d]);
    g.position = uint3(gpos[0], gpos[1], gpos[2]);
    g.nthreads = actual[0] * actual[1] * actual[2];
    g.fibers = fibers.data();
    g.memory.assign(emu_kernel::emu_num_threadgroup_arrays, nullptr);
    g.memory_bytes = 0;
    g.barrier_epoch = 0;
    std::fill(std::begin(g.simd_epoch), std::end(g.simd_epoch), 0u);
    g.sync = static_cast<char*>(std::malloc(2 + 2 * (g.nthreads / kSimdWidth + 1)));
#if defined(__SANITIZE_THREAD__)
    // Fresh stack memory: the previous threadgroup's fibers are other threads to TSan.
    munmap(g_stacks, g_stacks_bytes);
    allocate_stacks(tg_threads);
#endif
    unsigned k = 0;
    for (unsigned z = 0; z < actual[2]; ++z)
      for (unsigned y = 0; y < actual[1]; ++y)
        for (unsigned x = 0; x < actual[0]; ++x, ++k) {
          set_ids(fibers[k].ids, gpos, actual, x, y, z);
          start_fiber(fibers[k], k);
        }
    run_group(order);
    for (unsigned i = 0; i < g.nthreads; ++i) finish_fiber(fibers[i]);
    for (void* p : g.memory) std::free(p);
    std::free(g.sync);
  }
}

// ---- spec file, buffers, main -------------------------------------------------------------

static void read_spec(const char* path) {
  Launch& L = g_launch;
  FILE* f = std::fopen(path, "r");
  if (!f) fail("cannot open spec file %s", path);
  char key[32], mode[16], buffer_path[4096];
  while (std::fscanf(f, "%31s", key) == 1) {
    if (!std::strcmp(key, "grid")) {
      if (std::fscanf(f, "%u %u %u", &L.grid[0], &L.grid[1], &L.grid[2]) != 3) fail("bad grid");
    } else if (!std::strcmp(key, "threadgroup")) {
      if (std::fscanf(f, "%u %u %u", &L.tg[0], &L.tg[1], &L.tg[2]) != 3) fail("bad threadgroup");
    } else if (!std::strcmp(key, "schedule")) {
      unsigned long long seed = 0;
      if (std::fscanf(f, "%15s %llu", mode, &seed) != 2) fail("bad schedule");
      L.schedule = !std::strcmp(mode, "reverse") ? Launch::reverse
                   : !std::strcmp(mode, "random") ? Launch::random
                                                  : Launch::inorder;
      L.rng = seed * 0x9E3779B97F4A7C15ULL + 1;
    } else if (!std::strcmp(key, "buffer")) {
      std::size_t n;
      if (std::fscanf(f, "%zu %15s %4095s", &n, mode, buffer_path) != 3) fail("bad buffer");
      L.sizes.push_back(n);
      L.writeback.push_back(!std::strcmp(mode, "out"));
      L.paths.push_back(strdup(buffer_path));
    } else {
      fail("unknown spec key %s", key);
    }
  }
  std::fclose(f);
  for (int d = 0; d < 3; ++d) {
    if (L.grid[d] == 0 || L.tg[d] == 0) fail("grid and threadgroup sizes must be positive");
    L.tg[d] = std::min(L.tg[d], L.grid[d]);  // as MLX dispatches: min(threadgroup, grid)
    L.groups[d] = (L.grid[d] + L.tg[d] - 1) / L.tg[d];
  }
}

static void load_buffers() {
  Launch& L = g_launch;
  if (L.paths.size() != std::size_t(emu_kernel::emu_num_buffers))
    fail("spec has %zu buffers, the kernel takes %d", L.paths.size(), emu_kernel::emu_num_buffers);
  for (std::size_t i = 0; i < L.paths.size(); ++i) {
    // Exact size, so that AddressSanitizer reports any access past the end.
    void* p = std::malloc(L.sizes[i] ? L.sizes[i] : 1);
    FILE* f = std::fopen(L.paths[i], "rb");
    if (!p || !f || std::fread(p, 1, L.sizes[i], f) != L.sizes[i])
      fail("cannot read buffer %zu from %s", i, L.paths[i]);
    std::fclose(f);
    L.buffers.push_back(p);
  }
}

static void store_outputs() {
  Launch& L = g_launch;
  for (std::size_t i = 0; i < L.paths.size(); ++i) {
    if (L.writeback[i]) {
      FILE* f = std::fopen(L.paths[i], "wb");
      if (!f || std::fwrite(L.buffers[i], 1, L.sizes[i], f) != L.sizes[i])
        fail("cannot write buffer %zu to %s", i, L.paths[i]);
      std::fclose(f);
    }
    std::free(L.buffers[i]);
    std::free(L.paths[i]);
  }
}

#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
// Without a sanitizer, say which GPU thread crashed.
static void on_fault(int sig) {
  char b[256];
  int n;
  if (g_current) {
    const uint3& p = g_current->ids.thread_position_in_grid;
    n = std::snprintf(b, sizeof b,
                      "metal-emulator: error: signal %d in GPU thread (%u,%u,%u) (out-of-bounds "
                      "access or fiber stack overflow; sanitizer=\"address\" tells which line)\n",
                      sig, p.x, p.y, p.z);
  } else {
    n = std::snprintf(b, sizeof b, "metal-emulator: error: signal %d in the scheduler\n", sig);
  }
  if (write(2, b, std::size_t(n)) < 0) _exit(4);
  _exit(4);
}
static void install_fault_handler() {
  static char altstack[65536];
  stack_t ss{};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof altstack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_handler = on_fault;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  sigaction(SIGFPE, &sa, nullptr);
}
#else
static void install_fault_handler() {}
#endif

}  // namespace emu

int main(int argc, char** argv) {
  if (argc != 2) emu::fail("usage: %s SPEC", argv[0]);
#if defined(__SANITIZE_THREAD__)
  emu::g_scheduler_tsan = __tsan_get_current_fiber();
  __tsan_ignore_thread_begin();  // the scheduler's accesses never race with kernel code
#endif
  emu::install_fault_handler();
  emu::read_spec(argv[1]);
  emu::load_buffers();
  emu::run_grid();
  emu::store_outputs();
#if defined(__SANITIZE_THREAD__)
  __tsan_ignore_thread_end();
#endif
  return 0;
}
