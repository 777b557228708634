// SIMT emulator: lets kernel source written in a small CUDA subset compile as host C++20 and run on the
// CPU, one real OS thread per CUDA thread, so CI machines without a GPU execute the real kernel code, and
// check it as compute-sanitizer would on a GPU (tests only).
//
// Include this header before any kernel source. What is emulated:
//   * threadIdx / blockIdx / blockDim / gridDim, __syncthreads, __syncwarp, warp shuffles (full mask),
//     atomics, __threadfence, shared memory (SharedArray), global memory through the kernels' pointers
//     (Restrict, Global), the blocks' partials read across blocks (BlockPartials), and a launcher with
//     CUDA's launch-size checks.
// Execution model (a kernel author must respect these):
//   * A launch's blocks start in a seeded random order, several at once on different OS threads
//     (settings(): seed, concurrent_blocks), so any block can be the last of a grid merge; the threads
//     of a block run truly concurrently. Launches are serialized process-wide. Kernels must not
//     spin-wait on other blocks (inter-block communication only through "last block finishes the job").
//   * Shared memory is `__shared__ SharedArray<T, N> name;` (csrc/cuda/device_memory.h under nvcc): one
//     copy per running block, filled with 0xFF at block start. Plain `__shared__ T name[N]` would be
//     one static copy for every block, which is wrong here: the kernels use SharedArray only.
//   * Block sizes must be a multiple of 32 (<= 1024), so every warp is full; shuffles and __syncwarp
//     accept only the full mask 0xffffffff and all 32 lanes must call the same one.
// The sanitizer (settings().sanitize, on unless FUSEDBN_SIMT_SANITIZE=0) reports, naming the kernel, the
// block and thread, and the shared element, barrier or address:
//   * shared memory read before any thread of the block wrote it (initcheck), and races: a read of an
//     element another thread wrote, or a write of one another thread read or wrote, since the last
//     barrier ordering the two (__syncthreads; __syncwarp within a warp; a shuffle orders nothing but its
//     own values) (racecheck);
//   * a __syncthreads, __syncwarp or shuffle that the threads reach at different places in the source
//     (synccheck), or that some never reach: reported as soon as the missing threads have exited, or
//     after a timeout (10 s, env FUSEDBN_SIMT_TIMEOUT_S, or set_timeout_seconds), not hung;
//   * a read of another block's partial that the GPU memory model does not order after its write: the
//     writer fenced after writing and arrived (atomic) after the fence, the reader arrived later on the
//     same counter and fenced before reading (any thread's fence or arrival counts where a
//     __syncthreads orders it with the access);
//   * memory that a __restrict__ pointer (Restrict) reads or writes and another pointer writes, or that it
//     writes and another reads, in the same launch (checked after the grid);
//   * out-of-bounds shared indices and static shared memory beyond the device's per-block limit.
// The first exception any emulated thread throws is rethrown by the launch, after every thread of the
// block has been released, with the launch's block-order seed.
#pragma once

#if defined(__CUDACC__)
#error "simt.h is the host emulation of CUDA; do not include it in nvcc builds"
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <semaphore>
#include <source_location>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

// ---- CUDA keywords: every function is a host function here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A SharedArray declared __shared__ is a static object that only names its per-block storage (see above).
#define __shared__ static
// device_memory.h: the kernels' SharedArray and BlockPartials are the emulator's.
#define FUSEDBN_SIMT_DEVICE_MEMORY 1

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// Set by the launcher for each emulated thread before it enters the kernel.
inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace fusedbn::simt {

// ---- Settings, process-wide.

inline uint64_t env_u64(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 0) : fallback;
}

struct Settings {
  // Block order: launch k after set_seed(s) runs its blocks in the permutation seeded by (s, k).
  std::atomic<uint64_t> seed{env_u64("FUSEDBN_SIMT_SEED", std::random_device{}())};
  std::atomic<uint64_t> launches_since_seed{0};
  // Blocks running at once (each on its own OS threads).
  std::atomic<unsigned> concurrent_blocks{static_cast<unsigned>(env_u64("FUSEDBN_SIMT_CONCURRENT_BLOCKS", 4))};
  std::atomic<bool> sanitize{env_u64("FUSEDBN_SIMT_SANITIZE", 1) != 0};
  // Launches are validated and recorded (recorded_launches), not run: what the host code would launch on
  // the emulated device, at shapes too large to emulate.
  std::atomic<bool> record_only{false};
  std::atomic<double> timeout_s{[] {
    const char* env = std::getenv("FUSEDBN_SIMT_TIMEOUT_S");
    const double s = env ? std::strtod(env, nullptr) : 0.0;
    return s > 0 ? s : 10.0;
  }()};
};

// Static shared memory a block may declare (CUDA's limit without opt-in).
constexpr size_t kSharedBytesPerBlock = 48 * 1024;

inline Settings& settings() {
  static Settings s;
  return s;
}
inline void set_seed(uint64_t seed) {
  settings().seed = seed;
  settings().launches_since_seed = 0;
}
// How long a barrier waits for the rest of its threads before declaring a deadlock.
inline void set_timeout_seconds(double s) { settings().timeout_s.store(s > 0 ? s : 10.0); }
inline double timeout_seconds() { return settings().timeout_s.load(); }

namespace detail {

inline std::string seconds_str(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}
inline std::string str(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}
inline std::string address_str(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}
inline dim3 coordinates(uint64_t linear, dim3 extent) {
  return dim3(static_cast<unsigned>(linear % extent.x), static_cast<unsigned>(linear / extent.x % extent.y),
              static_cast<unsigned>(linear / (uint64_t(extent.x) * extent.y)));
}

// A place in the source: where a barrier or shuffle is called, or a shared array declared.
struct Site {
  const char* file = nullptr;
  unsigned line = 0;
  Site() = default;
  explicit Site(const std::source_location& l) : file(l.file_name()), line(l.line()) {}
  bool operator==(const Site& o) const {
    return line == o.line && (file == o.file || (file && o.file && std::strcmp(file, o.file) == 0));
  }
  std::string str() const {
    if (!file) return "?";
    const char* base = std::strrchr(file, '/');
    return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
  }
};

// A reusable barrier for `count` threads that can fail instead of hanging: on timeout, once the threads
// that have exited the kernel make completion impossible, or when two threads wait at different places
// (sites) in the same generation; it then becomes "broken" and every current and future waiter throws
// the same message.
class Barrier {
 public:
  void reset(unsigned count, std::string what) {
    std::lock_guard lk(m_);
    count_ = count, arrived_ = 0, exited_ = 0, what_ = std::move(what), broken_.clear();
  }

  // `who` describes the calling thread, for the message when the sites differ.
  void wait(Site site, const std::string& who) {
    std::unique_lock lk(m_);
    throw_if_broken();
    const uint64_t gen = generation_;
    if (arrived_ == 0) {
      site_ = site, first_ = who;
    } else if (!(site == site_)) {
      fail("simt: " + what_ + " divergence: " + who + " waits at " + site.str() + " while " + first_ +
           " waits at " + site_.str() + " (the threads took different paths to a barrier)");
    }
    if (++arrived_ == count_) {
      arrived_ = 0, ++generation_;
      lk.unlock();  // so the woken threads do not immediately block on m_ again
      cv_.notify_all();
      return;
    }
    if (arrived_ + exited_ == count_) fail(exited_message());
    const auto deadline = std::chrono::steady_clock::now() +
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(timeout_seconds()));
    while (generation_ == gen) {
      throw_if_broken();
      if (cv_.wait_until(lk, deadline) == std::cv_status::timeout && generation_ == gen && broken_.empty())
        fail("simt: " + what_ + " deadlock: only " + std::to_string(arrived_) + " of " + std::to_string(count_) +
             " threads arrived at " + site_.str() + " within " + seconds_str(timeout_seconds()) +
             " s (a barrier in divergent code?)");
    }
  }

  // A thread left the kernel: it will never arrive again.
  void exit() {
    std::lock_guard lk(m_);
    ++exited_;
    if (arrived_ > 0 && arrived_ + exited_ == count_ && broken_.empty()) breakdown(exited_message());
  }

  void break_now(const std::string& why) {
    std::lock_guard lk(m_);
    breakdown(why);
  }

 private:
  void breakdown(std::string why) {  // requires m_ held
    if (broken_.empty()) broken_ = std::move(why);
    cv_.notify_all();
  }
  std::string exited_message() const {
    return "simt: " + what_ + " deadlock: " + std::to_string(arrived_) + " of " + std::to_string(count_) +
           " threads wait at " + site_.str() + ", which the other " + std::to_string(exited_) +
           " can never reach (they exited the kernel)";
  }
  void throw_if_broken() const {
    if (!broken_.empty()) throw std::runtime_error(broken_);
  }
  [[noreturn]] void fail(std::string why) {
    breakdown(std::move(why));
    throw std::runtime_error(broken_);
  }

  std::mutex m_;
  std::condition_variable cv_;
  unsigned count_ = 0, arrived_ = 0, exited_ = 0;
  uint64_t generation_ = 0;
  Site site_;
  std::string what_, broken_, first_;
};

// Where a thread is in the block's happens-before order: barriers passed and its own events so far.
struct Position {
  uint32_t thread = 0;    // linear index in the block
  uint32_t barriers = 0;  // __syncthreads passed
  uint32_t warp_syncs = 0;  // __syncwarp passed
  uint64_t step = 0;      // this thread's sanitizer events so far (program order)
};

// Whether `a` (an earlier access or event) happens before the current position `b` of a thread of the same
// block: program order, a __syncthreads between them, or a __syncwarp between two lanes of one warp.
inline bool happens_before(const Position& a, const Position& b) {
  if (a.thread == b.thread) return a.step < b.step;
  return a.barriers < b.barriers || (a.thread / 32 == b.thread / 32 && a.barriers == b.barriers &&
                                     a.warp_syncs < b.warp_syncs);
}

// ---- Shared memory: one region per (running block, SharedArray declaration), with a shadow per element.

struct SharedCell {
  bool written = false;
  Position writer;
  std::vector<Position> readers;  // since the last write, of the current barrier interval
};

struct SharedRegion {
  std::vector<std::byte> storage;
  std::byte* data = nullptr;  // 64-byte aligned within storage
  std::vector<SharedCell> cells;
};

struct Warp {
  Barrier barrier;
  uint64_t slots[2][32];  // shuffle exchange buffers (used alternately), one value (<= 8 bytes) per lane
};

// Everything the threads of one running block share.
struct Block {
  dim3 idx;
  uint64_t linear = 0;  // blockIdx as a linear index, x fastest
  Barrier barrier;
  std::vector<Warp> warps;
  std::mutex error_mutex;
  std::exception_ptr error;
  std::mutex shared_mutex;
  std::unordered_map<const void*, SharedRegion> shared;  // by declaration
  size_t shared_bytes = 0;

  explicit Block(unsigned threads) : warps(threads / 32) {}
  void start(dim3 block_idx, uint64_t block_linear, unsigned threads) {
    idx = block_idx, linear = block_linear, error = nullptr;
    barrier.reset(threads, "__syncthreads of block " + str(idx));
    for (size_t w = 0; w < warps.size(); ++w)
      warps[w].barrier.reset(32, "warp " + std::to_string(w) + " of block " + str(idx));
    shared.clear();
    shared_bytes = 0;
  }
  // Keep the first exception, then release every thread still waiting anywhere in the block.
  void fail(std::exception_ptr e) {
    std::string why = "simt: another thread of the block failed";
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      why = ex.what();
    } catch (...) {
    }
    {
      std::lock_guard lk(error_mutex);
      if (!error) error = e;
    }
    barrier.break_now(why);
    for (Warp& w : warps) w.barrier.break_now(why);
  }
};

// ---- Global memory through the kernels' pointers (Pointer, below): the address range each pointer read
// and wrote, with the first block and thread that did.
struct Span {
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  uint64_t block = 0;
  uint32_t thread = 0;
  bool empty() const { return hi == 0; }
  void add(uintptr_t a, size_t bytes, uint64_t b, uint32_t t) {
    if (empty()) block = b, thread = t;
    lo = std::min(lo, a), hi = std::max<uintptr_t>(hi, a + bytes);
  }
  void add(const Span& o) {
    if (o.empty()) return;
    if (empty()) block = o.block, thread = o.thread;
    lo = std::min(lo, o.lo), hi = std::max(hi, o.hi);
  }
  bool overlaps(const Span& o) const { return !empty() && !o.empty() && lo < o.hi && o.lo < hi; }
};

// A pointer is named by the address the host gave it and whether it is restrict-qualified.
struct PointerUse {
  uintptr_t base;
  bool restricted;
  Span read, written;
};

inline PointerUse& use_of(std::vector<PointerUse>& uses, uintptr_t base, bool restricted) {
  for (PointerUse& u : uses) {
    if (u.base == base && u.restricted == restricted) return u;
  }
  return uses.emplace_back(PointerUse{base, restricted, {}, {}});
}

// ---- Cross-block memory ordering of one launch (the sanitizer's record of partials, fences, atomics).

struct Launch {
  std::string kernel;
  uint64_t base_seed = 0, index = 0;  // the settings' seed, and this launch's count since it was set
  uint64_t seed = 0;                  // of the block order, from the two
  bool sanitize = true;

  struct Event {
    uint64_t block;
    Position at;
  };
  struct Atomic {
    Position at;
    uintptr_t address;
    uint64_t order;  // position in the address's modification order
  };
  struct BlockLog {
    std::vector<Position> fences;
    std::vector<Atomic> atomics;
  };
  std::mutex m;
  std::vector<PointerUse> pointer_uses;                 // merged from every thread's, by pointer
  std::unordered_map<uintptr_t, Event> partial_writes;  // last write of each partial's first byte
  std::unordered_map<uint64_t, BlockLog> blocks;
  std::unordered_map<uintptr_t, uint64_t> modifications;  // atomic operations so far, per address
};

struct ThreadContext {
  Block* block = nullptr;
  Launch* launch = nullptr;
  Position at;
  unsigned shuffles = 0;  // shuffles this thread has done in this block: picks the exchange buffer
  std::vector<PointerUse> uses;  // this thread's, merged into the launch's when it exits
  unsigned linear() const { return at.thread; }
};
inline thread_local ThreadContext context;

inline ThreadContext& current(const char* what) {
  if (!context.block) throw std::logic_error(std::string("simt: ") + what + " called outside a kernel launch");
  return context;
}

inline std::string thread_str(unsigned linear) { return "thread " + str(coordinates(linear, blockDim)); }

// "kernel K, block (x, y, z), thread (x, y, z)" of the calling emulated thread.
inline std::string where() {
  const ThreadContext& c = context;
  return "kernel " + (c.launch ? c.launch->kernel : std::string("?")) + ", block " + str(blockIdx) + ", " +
         thread_str(c.linear());
}

[[noreturn]] inline void report(const std::string& check, const std::string& detail) {
  throw std::runtime_error("simt: " + check + " in " + where() + ": " + detail);
}

inline bool sanitizing() { return context.launch && context.launch->sanitize; }

// Worker threads kept across launches, each woken through its own semaphore (no shared lock for the
// whole block to contend on). Worker i runs thread i of a block, so all threads of a block exist
// concurrently, as barriers require.
class Pool {
  struct Worker {
    std::binary_semaphore go{0};
    std::thread thread;
  };

 public:
  ~Pool() {
    stopping_ = true;
    for (auto& w : workers_) w->go.release();
    for (auto& w : workers_) w->thread.join();
  }

  void run(unsigned n, const std::function<void(unsigned)>& task) {
    while (workers_.size() < n) {
      workers_.push_back(std::make_unique<Worker>());
      Worker& w = *workers_.back();
      w.thread = std::thread([this, &w, i = unsigned(workers_.size() - 1)] { loop(w, i); });
    }
    task_ = &task;
    remaining_ = n;
    for (unsigned i = 0; i < n; ++i) workers_[i]->go.release();
    done_.acquire();
  }

 private:
  void loop(Worker& self, unsigned i) {
    for (;;) {
      self.go.acquire();
      if (stopping_) return;
      (*task_)(i);  // never throws: the task catches everything
      if (remaining_.fetch_sub(1) == 1) done_.release();
    }
  }

  std::vector<std::unique_ptr<Worker>> workers_;  // grown only by run(), while every worker sleeps
  const std::function<void(unsigned)>* task_ = nullptr;
  std::atomic<unsigned> remaining_{0};
  std::binary_semaphore done_{0};
  bool stopping_ = false;
};

// One pool per concurrently running block; grown under the launch mutex, destroyed at exit.
inline std::vector<std::unique_ptr<Pool>>& pools() {
  static std::vector<std::unique_ptr<Pool>> p;
  return p;
}
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline void validate(dim3 grid, dim3 block, size_t dynamic_smem_bytes) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("simt: " + msg); };
  if (block.x < 1 || block.y < 1 || block.z < 1) fail("block dimensions " + str(block) + " must all be >= 1");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1) fail("grid dimensions " + str(grid) + " must all be >= 1");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    fail("grid " + str(grid) + " exceeds the limits (2147483647, 65535, 65535)");
  if (block.x > 1024 || block.y > 1024 || block.z > 64)
    fail("block " + str(block) + " exceeds the limits (1024, 1024, 64)");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads > 1024) fail("block of " + std::to_string(threads) + " threads exceeds the limit of 1024");
  if (threads % 32 != 0)
    fail("block of " + std::to_string(threads) + " threads is not a multiple of the warp size 32");
  if (dynamic_smem_bytes > 0) fail("dynamic shared memory is not supported");
}

// The launch's blocks in a random order seeded by `seed`.
inline std::vector<uint64_t> block_order(uint64_t blocks, uint64_t seed) {
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), uint64_t(0));
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  return order;
}

inline void merge_pointer_uses(Launch& launch, const std::vector<PointerUse>& uses) {
  if (uses.empty()) return;
  std::lock_guard lk(launch.m);
  for (const PointerUse& u : uses) {
    PointerUse& merged = use_of(launch.pointer_uses, u.base, u.restricted);
    merged.read.add(u.read);
    merged.written.add(u.written);
  }
}

// __restrict__ promises the compiler that, while a restrict pointer's accesses and some write touch the
// same memory, no other pointer accesses it: a launch that reads or writes through one what another
// pointer writes (or writes what another reads) lets the GPU build reorder or cache the accesses.
inline void check_restrict(const Launch& launch, dim3 grid, dim3 block) {
  if (!launch.sanitize) return;
  auto who = [&](const Span& s) {
    return "block " + str(coordinates(s.block, grid)) + ", thread " + str(coordinates(s.thread, block));
  };
  auto range = [](const Span& s) { return "[" + address_str(reinterpret_cast<void*>(s.lo)) + ", " +
                                          address_str(reinterpret_cast<void*>(s.hi)) + ")"; };
  auto pointer = [](const PointerUse& u) {
    return std::string(u.restricted ? "the __restrict__ pointer" : "the pointer") + " given " +
           address_str(reinterpret_cast<void*>(u.base));
  };
  for (const PointerUse& r : launch.pointer_uses) {
    if (!r.restricted) continue;
    for (const PointerUse& other : launch.pointer_uses) {
      if (&other == &r) continue;
      const Span* mine = nullptr;
      const Span* theirs = nullptr;
      const char* how = "";
      if (other.written.overlaps(r.read)) mine = &r.read, theirs = &other.written, how = "reads";
      else if (other.written.overlaps(r.written)) mine = &r.written, theirs = &other.written, how = "writes";
      else if (r.written.overlaps(other.read)) mine = &r.written, theirs = &other.read, how = "writes";
      if (!mine) continue;
      const bool other_writes = theirs == &other.written;
      throw std::runtime_error(
          "simt: __restrict__ aliasing in kernel " + launch.kernel + ": " + who(*mine) + " " + how + " " + range(*mine) +
          " through " + pointer(r) + ", and " + who(*theirs) + (other_writes ? " writes " : " reads ") + range(*theirs) +
          " through " + pointer(other) + " in the same launch");
    }
  }
}

// Runs `body` (the kernel call) on every thread of every block, settings().concurrent_blocks blocks at a
// time in the order block_order(launch.seed); rethrows the first failure with the seed that reproduces it.
inline void run_grid(dim3 grid, dim3 dim, const std::function<void()>& body, Launch& launch) {
  std::lock_guard launch_lock(launch_mutex());
  const unsigned threads = dim.x * dim.y * dim.z;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const std::vector<uint64_t> order = block_order(blocks, launch.seed);
  const unsigned slots = static_cast<unsigned>(std::min<uint64_t>(std::max(1u, settings().concurrent_blocks.load()), blocks));
  while (pools().size() < slots) pools().push_back(std::make_unique<Pool>());
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr error;

  auto slot_main = [&](unsigned slot) {
    Block block(threads);
    const std::function<void(unsigned)> thread_main = [&](unsigned i) {
      threadIdx = coordinates(i, dim);
      blockIdx = block.idx, blockDim = dim, gridDim = grid;
      context = {};
      context.block = &block, context.launch = &launch, context.at.thread = i;
      try {
        body();
      } catch (...) {
        block.fail(std::current_exception());
      }
      merge_pointer_uses(launch, context.uses);
      block.barrier.exit();
      block.warps[i / 32].barrier.exit();
      context = {};
    };
    for (uint64_t k; !failed && (k = next.fetch_add(1)) < blocks;) {
      block.start(coordinates(order[k], grid), order[k], threads);
      pools()[slot]->run(threads, thread_main);
      if (block.error) {
        std::lock_guard lk(error_mutex);
        if (!error) error = block.error;
        failed = true;
      }
    }
  };
  std::vector<std::thread> others;
  for (unsigned s = 1; s < slots; ++s) others.emplace_back(slot_main, s);
  slot_main(0);
  for (std::thread& t : others) t.join();
  if (!error) {
    try {
      check_restrict(launch, grid, dim);
    } catch (...) {
      error = std::current_exception();
    }
  }
  if (error) {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      throw std::runtime_error(std::string(e.what()) + " [blocks in random order: launch " + std::to_string(launch.index) +
                               " since FUSEDBN_SIMT_SEED=" + std::to_string(launch.base_seed) + ", concurrent blocks " +
                               std::to_string(slots) + "]");
    }
  }
}

// Converts launch arguments to the kernel's parameter types exactly like a function call would.
template <typename... P>
std::tuple<std::decay_t<P>...> as_params(std::type_identity_t<P>... args) {
  return {args...};
}

// "(&name<A, B>)" -> "name<A, B>": the kernel as the launch spelled it.
inline std::string kernel_name(std::string_view spelled) {
  while (!spelled.empty() && (spelled.front() == '(' || spelled.front() == '&' || spelled.front() == ' '))
    spelled.remove_prefix(1);
  while (!spelled.empty() && (spelled.back() == ')' || spelled.back() == ' ')) spelled.remove_suffix(1);
  return std::string(spelled);
}

inline void check_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) report("synccheck", std::string(what) + " with mask " + std::to_string(mask) +
                                                   ": only the full warp mask 0xffffffff is supported");
}

// A value of type T travels through the warp's exchange buffer: write, wait for all lanes, read the
// source lane. Consecutive shuffles alternate between two buffers, so the barrier of the next shuffle is
// also the "everyone has read" wait that must precede rewriting this buffer: a lane can only reach the
// shuffle after next once every lane has arrived at the next one, i.e. has finished reading this one.
template <typename T, typename SourceLane>
T exchange(unsigned mask, T value, int width, SourceLane source_lane, Site site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
  ThreadContext& c = current("warp shuffle");
  check_full_mask(mask, "warp shuffle");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    throw std::runtime_error("simt: shuffle width " + std::to_string(width) + " is not a power of two <= 32");
  Warp& w = c.block->warps[c.linear() / 32];
  const unsigned lane = c.linear() % 32, segment = lane & ~unsigned(width - 1);
  uint64_t* slots = w.slots[c.shuffles++ % 2];
  std::memcpy(&slots[lane], &value, sizeof(T));
  w.barrier.wait(site, thread_str(c.linear()) + " (a shuffle)");
  T out;
  std::memcpy(&out, &slots[source_lane(lane, segment) % 32], sizeof(T));
  return out;
}

// ---- Sanitizer records of the cross-block protocol (Launch).

inline Launch::BlockLog& block_log(Launch& l) { return l.blocks[context.block->linear]; }
inline Position next_position() {
  ++context.at.step;
  return context.at;
}

// The writer block's arrival atomics that release `write`: after a fence that follows the write (sets
// `fenced` where there is such a fence).
inline std::vector<const Launch::Atomic*> releases_of(const Launch::BlockLog& log, const Position& write, bool& fenced) {
  std::vector<const Launch::Atomic*> out;
  fenced = false;
  for (const Position& f : log.fences) {
    if (!happens_before(write, f)) continue;
    fenced = true;
    for (const Launch::Atomic& a : log.atomics) {
      if (happens_before(f, a.at)) out.push_back(&a);
    }
  }
  return out;
}

// Whether the reader's block acquired `release` before `read`: an atomic later in the same address's
// modification order, then a fence, then the read.
inline bool acquires(const Launch::BlockLog& log, const Launch::Atomic& release, const Position& read) {
  for (const Launch::Atomic& a : log.atomics) {
    if (a.address != release.address || a.order <= release.order) continue;
    for (const Position& f : log.fences) {
      if (happens_before(a.at, f) && happens_before(f, read)) return true;
    }
  }
  return false;
}

inline void record_fence() {
  if (!sanitizing()) return;
  Launch& l = *context.launch;
  std::lock_guard lk(l.m);
  block_log(l).fences.push_back(next_position());
}

template <typename F>
auto record_atomic(void* address, F&& op) {
  if (!sanitizing()) return op();
  Launch& l = *context.launch;
  std::lock_guard lk(l.m);
  const auto old = op();
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  block_log(l).atomics.push_back({next_position(), a, l.modifications[a]++});
  return old;
}

template <typename T>
void partial_store(T* p, const T& v) {
  if (!sanitizing()) {
    *p = v;
    return;
  }
  Launch& l = *context.launch;
  std::lock_guard lk(l.m);
  std::memcpy(static_cast<void*>(p), &v, sizeof(T));
  l.partial_writes[reinterpret_cast<uintptr_t>(p)] = {context.block->linear, next_position()};
}

template <typename T>
T partial_load(const T* p) {
  T v;
  if (!sanitizing()) {
    std::memcpy(&v, p, sizeof(T));
    return v;
  }
  Launch& l = *context.launch;
  std::lock_guard lk(l.m);
  const Position read = next_position();
  const auto it = l.partial_writes.find(reinterpret_cast<uintptr_t>(p));
  const std::string what = "the partial at " + address_str(p);
  if (it == l.partial_writes.end())
    report("cross-block ordering", "reads " + what + ", which no block has written in this launch");
  const Launch::Event& w = it->second;
  if (w.block == context.block->linear) {
    if (!happens_before(w.at, read))
      report("cross-block ordering", "reads " + what + ", written by " + thread_str(w.at.thread) +
                                         " of the same block with no __syncthreads between");
  } else {
    const std::string writer = "block " + str(coordinates(w.block, gridDim)) + ", " + thread_str(w.at.thread);
    bool fenced = false;
    const auto releases = releases_of(l.blocks[w.block], w.at, fenced);
    if (!fenced)
      report("cross-block ordering", "reads " + what + " written by " + writer + ", which did not __threadfence after writing it");
    if (releases.empty())
      report("cross-block ordering", "reads " + what + " written by " + writer + ", whose block did not arrive (atomic) after the fence");
    const Launch::BlockLog& mine = block_log(l);
    if (std::none_of(releases.begin(), releases.end(), [&](const Launch::Atomic* r) { return acquires(mine, *r, read); }))
      report("cross-block ordering",
             "reads " + what + " written by " + writer + " without acquiring it: the reading block must arrive on the counter at " +
                 address_str(reinterpret_cast<void*>(releases.front()->address)) +
                 " after the writer did, and __threadfence between that arrival and the read");
  }
  std::memcpy(&v, p, sizeof(T));
  return v;
}

inline void note_access(const void* base, bool restricted, bool write, const void* address, size_t bytes) {
  if (!sanitizing()) return;
  PointerUse& u = use_of(context.uses, reinterpret_cast<uintptr_t>(base), restricted);
  (write ? u.written : u.read).add(reinterpret_cast<uintptr_t>(address), bytes, context.block->linear, context.at.thread);
}

}  // namespace detail

// Kernel launches since the process started (a test reads it to check the ops' launch budget).
inline std::atomic<uint64_t>& launch_count() {
  static std::atomic<uint64_t> count{0};
  return count;
}

// A launch as the host code made it, kept in record-only mode (Settings::record_only).
struct RecordedLaunch {
  std::string kernel;  // with its template arguments, as the compiler spells the instantiation
  dim3 grid, block;
  size_t dynamic_shared_bytes;
};
struct Recorded {
  std::mutex mutex;
  std::vector<RecordedLaunch> launches;
};
inline Recorded& recorded() {
  static Recorded r;
  return r;
}

namespace detail {
// The instantiation kKernel names, e.g. "fusedbn::cuda::channels_last_reduce_kernel<..., 4>" (from the
// compiler's signature of this function, "... [with auto kKernel = <name>; <other names> = ...]").
template <auto kKernel>
std::string instantiation_name() {
  const std::string_view pretty = __PRETTY_FUNCTION__, marker = "kKernel = ";
  std::string_view name = pretty.substr(pretty.find(marker) + marker.size());
  name = name.substr(0, std::min(name.find("; "), name.rfind(']')));
  return kernel_name(name);
}
}  // namespace detail

// launch(kernel, grid, block, smem, name)(args...) runs the whole grid synchronously (see the top of file).
// `instantiation` names the kernel in record-only mode (detail::instantiation_name).
template <typename... KArgs>
auto launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t dynamic_smem_bytes, const char* name = "kernel",
            std::string instantiation = {}) {
  detail::validate(grid, block, dynamic_smem_bytes);
  ++launch_count();
  const bool run = !settings().record_only;
  if (!run) {
    const std::lock_guard lock(recorded().mutex);
    recorded().launches.push_back({instantiation.empty() ? detail::kernel_name(name) : instantiation, grid, block,
                                   dynamic_smem_bytes});
  }
  return [kernel, grid, block, name, run](auto&&... args) {
    static_assert(sizeof...(args) == sizeof...(KArgs), "wrong number of kernel arguments");
    if (!run) return;
    auto params = detail::as_params<KArgs...>(std::forward<decltype(args)>(args)...);
    detail::Launch launch;
    launch.kernel = detail::kernel_name(name);
    launch.base_seed = settings().seed.load();
    launch.index = settings().launches_since_seed.fetch_add(1);
    launch.seed = launch.base_seed * 0x9E3779B97F4A7C15ull + launch.index;
    launch.sanitize = settings().sanitize.load();
    detail::run_grid(grid, block, [&] { std::apply(kernel, params); }, launch);
  };
}

// ---- Shared memory. `__shared__ SharedArray<T, N> name;` declares it; name[i] reads and writes element i
// of the running block's copy through a reference object, checked by the sanitizer.

template <typename T, int N>
class SharedArray;

template <typename T, int N>
class SharedRef {
 public:
  SharedRef(const SharedArray<T, N>* array, size_t index) : array_(array), index_(index) {}
  operator T() const { return array_->load(index_); }
  SharedRef& operator=(const T& v) {
    array_->store(index_, v);
    return *this;
  }
  SharedRef& operator=(const SharedRef& other) { return *this = static_cast<T>(other); }

 private:
  const SharedArray<T, N>* array_;
  size_t index_;
};

template <typename T, int N>
class SharedArray {
  static_assert(std::is_trivially_copyable_v<T>, "shared memory holds trivially copyable values");
  static_assert(N > 0, "a shared array holds at least one element");

 public:
  explicit SharedArray(std::source_location where = std::source_location::current()) : where_(where) {}
  SharedArray(const SharedArray&) = delete;

  template <typename I>
  SharedRef<T, N> operator[](I i) const {
    if ((std::is_signed_v<I> && i < I(0)) || static_cast<size_t>(i) >= static_cast<size_t>(N))
      detail::report("shared-memory bounds", "index " + std::to_string(i) + " of " + name() + " holds " + std::to_string(N) + " elements");
    return SharedRef<T, N>(this, static_cast<size_t>(i));
  }

  T load(size_t i) const {
    detail::Block& b = *detail::current("shared memory").block;
    std::lock_guard lk(b.shared_mutex);
    detail::SharedRegion& r = region(b);
    if (detail::sanitizing()) {
      detail::SharedCell& cell = r.cells[i];
      const detail::Position at = detail::next_position();
      if (!cell.written)
        detail::report("shared-memory initcheck", "reads " + element(i) + ", which no thread of the block has written");
      if (!detail::happens_before(cell.writer, at))
        detail::report("shared-memory race", "reads " + element(i) + ", written by " + detail::thread_str(cell.writer.thread) +
                                                 " with no barrier between (read after write)");
      std::erase_if(cell.readers, [&](const detail::Position& p) { return p.barriers < at.barriers || p.thread == at.thread; });
      cell.readers.push_back(at);
    }
    T v;
    std::memcpy(&v, r.data + i * sizeof(T), sizeof(T));
    return v;
  }

  void store(size_t i, const T& v) const {
    detail::Block& b = *detail::current("shared memory").block;
    std::lock_guard lk(b.shared_mutex);
    detail::SharedRegion& r = region(b);
    if (detail::sanitizing()) {
      detail::SharedCell& cell = r.cells[i];
      const detail::Position at = detail::next_position();
      if (cell.written && !detail::happens_before(cell.writer, at))
        detail::report("shared-memory race", "writes " + element(i) + ", written by " + detail::thread_str(cell.writer.thread) +
                                                 " with no barrier between (write after write)");
      for (const detail::Position& p : cell.readers) {
        if (!detail::happens_before(p, at))
          detail::report("shared-memory race", "writes " + element(i) + ", read by " + detail::thread_str(p.thread) +
                                                   " with no barrier between (write after read)");
      }
      cell.written = true, cell.writer = at, cell.readers.clear();
    }
    std::memcpy(r.data + i * sizeof(T), &v, sizeof(T));
  }

 private:
  std::string name() const { return "the __shared__ array declared at " + detail::Site(where_).str(); }
  std::string element(size_t i) const { return "element " + std::to_string(i) + " of " + name(); }

  // This block's copy, made on first use: filled with 0xFF (a NaN in every float type), its shadow empty.
  detail::SharedRegion& region(detail::Block& b) const {
    if (const auto it = b.shared.find(this); it != b.shared.end()) return it->second;
    if (b.shared_bytes + sizeof(T) * N > kSharedBytesPerBlock)
      detail::report("shared-memory size", "the block's static shared memory reaches " +
                                               std::to_string(b.shared_bytes + sizeof(T) * N) + " bytes with " + name() +
                                               ", over the limit of " + std::to_string(kSharedBytesPerBlock));
    b.shared_bytes += sizeof(T) * N;
    detail::SharedRegion& r = b.shared[this];
    r.storage.assign(sizeof(T) * N + 64, std::byte{0xFF});
    r.data = r.storage.data() + (64 - reinterpret_cast<uintptr_t>(r.storage.data()) % 64) % 64;
    r.cells.resize(N);
    return r;
  }

  std::source_location where_;
};

// ---- The blocks' partials of a grid merge: element i is written by one block and read by the last block
// of its group, through the cross-block protocol the sanitizer checks (see the top of file).

template <typename T>
class PartialRef {
 public:
  explicit PartialRef(T* p) : p_(p) {}
  operator T() const { return detail::partial_load(p_); }
  PartialRef& operator=(const T& v) {
    detail::partial_store(p_, v);
    return *this;
  }

 private:
  T* p_;
};

template <typename T>
struct BlockPartials {
  T* data;
  PartialRef<T> operator[](int64_t i) const { return PartialRef<T>(data + i); }
};

// ---- Global memory through the kernels' pointers: Restrict<T> (a `T* __restrict__` under nvcc) and
// Global<T> (a plain `T*`), device_memory.h. Each thread notes the address range it reads and writes
// through each pointer; after the grid, check_restrict reports memory that a restrict pointer accesses and
// another pointer writes (or that it writes and another reads) in the same launch.

template <typename T, bool kRestrict>
class Pointer;

template <typename T, bool kRestrict>
class GlobalRef {
 public:
  explicit GlobalRef(const Pointer<T, kRestrict>& p) : p_(p) {}
  operator T() const { return *p_.reading(0, 1); }
  GlobalRef& operator=(const T& v) {
    *p_.writing(0, 1) = v;
    return *this;
  }

 private:
  Pointer<T, kRestrict> p_;
};

template <typename T, bool kRestrict>
class Pointer {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;

  Pointer() = default;
  Pointer(std::nullptr_t) {}
  template <typename U>
    requires std::is_convertible_v<U*, T*>
  Pointer(U* p) : p_(p), base_(p) {}

  explicit operator bool() const { return p_ != nullptr; }
  Pointer operator+(int64_t i) const {
    Pointer q = *this;
    q.p_ += i;
    return q;
  }
  // Element i: its value where T is const, else a reference object that reads and writes it.
  auto operator[](int64_t i) const {
    if constexpr (std::is_const_v<T>) {
      return *(*this + i).reading(0, 1);
    } else {
      return GlobalRef<T, kRestrict>(*this + i);
    }
  }
  // The address of `count` elements at offset i, noted as read or written through this pointer.
  const value_type* reading(int64_t i, int count) const {
    detail::note_access(base_, kRestrict, false, p_ + i, sizeof(T) * count);
    return p_ + i;
  }
  value_type* writing(int64_t i, int count) const
    requires(!std::is_const_v<T>)
  {
    detail::note_access(base_, kRestrict, true, p_ + i, sizeof(T) * count);
    return p_ + i;
  }

 private:
  T* p_ = nullptr;
  T* base_ = nullptr;  // the address the host gave: names the pointer
};

template <typename T>
using Restrict = Pointer<T, true>;
template <typename T>
using Global = Pointer<T, false>;

// device_memory.h's reading(p, count) / writing(p, count): the address of count elements at p.
template <typename T, bool kRestrict>
const std::remove_cv_t<T>* reading(const Pointer<T, kRestrict>& p, int count) {
  return p.reading(0, count);
}
template <typename T, bool kRestrict>
T* writing(const Pointer<T, kRestrict>& p, int count) {
  return p.writing(0, count);
}

}  // namespace fusedbn::simt

// The kernels' launch macro (csrc/cuda/launch.h) under the emulator: the grid runs here, synchronously, and
// there is no CUDA error state to check.
#define FUSEDBN_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::fusedbn::simt::launch(kernel, grid, block, shared_bytes, #kernel, ::fusedbn::simt::detail::instantiation_name<kernel>())
#define FUSEDBN_LAUNCH_CHECK() ((void)0)

// ---- Device functions, in the global namespace like CUDA's.

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  auto& c = fusedbn::simt::detail::current("__syncthreads");
  c.block->barrier.wait(fusedbn::simt::detail::Site(loc), fusedbn::simt::detail::thread_str(c.linear()));
  ++c.at.barriers;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
  auto& c = fusedbn::simt::detail::current("__syncwarp");
  fusedbn::simt::detail::check_full_mask(mask, "__syncwarp");
  c.block->warps[c.linear() / 32].barrier.wait(fusedbn::simt::detail::Site(loc),
                                                fusedbn::simt::detail::thread_str(c.linear()) + " (__syncwarp)");
  ++c.at.warp_syncs;
}
// Barriers and atomics already order memory on the host; the sanitizer records the fence for the
// cross-block protocol.
inline void __threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  fusedbn::simt::detail::record_fence();
}

// Lanes outside [segment, segment + width) are not reachable; such reads return the caller's own value.
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
              std::source_location loc = std::source_location::current()) {
  return fusedbn::simt::detail::exchange(
      mask, var, width, [&](unsigned, unsigned segment) { return segment + (unsigned(src_lane) & unsigned(width - 1)); },
      fusedbn::simt::detail::Site(loc));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   std::source_location loc = std::source_location::current()) {
  return fusedbn::simt::detail::exchange(
      mask, var, width,
      [&](unsigned lane, unsigned segment) {
        return uint64_t(lane - segment) + delta < unsigned(width) ? lane + delta : lane;
      },
      fusedbn::simt::detail::Site(loc));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 std::source_location loc = std::source_location::current()) {
  return fusedbn::simt::detail::exchange(
      mask, var, width, [&](unsigned lane, unsigned segment) { return lane - segment >= delta ? lane - delta : lane; },
      fusedbn::simt::detail::Site(loc));
}
// Butterfly: lanes of earlier segments are reachable, later ones are not (CUDA's rule).
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  std::source_location loc = std::source_location::current()) {
  return fusedbn::simt::detail::exchange(
      mask, var, width,
      [&](unsigned lane, unsigned segment) {
        const unsigned src = lane ^ unsigned(lane_mask);
        return src < segment + unsigned(width) ? src : lane;
      },
      fusedbn::simt::detail::Site(loc));
}

// Atomics return the old value. T is deduced from the pointer only, so atomicAdd(&unsigned_counter, 1)
// converts the 1 like CUDA's overloads do.
template <typename T>
concept SimtAtomicAddable = std::is_same_v<T, int> || std::is_same_v<T, unsigned> ||
    std::is_same_v<T, unsigned long long> || std::is_same_v<T, float> || std::is_same_v<T, double>;
template <typename T>
concept SimtAtomicInteger = std::is_same_v<T, int> || std::is_same_v<T, unsigned> ||
    std::is_same_v<T, unsigned long long>;

template <SimtAtomicAddable T>
T atomicAdd(T* address, std::type_identity_t<T> val) {
  return fusedbn::simt::detail::record_atomic(address, [&] { return std::atomic_ref<T>(*address).fetch_add(val); });
}
template <SimtAtomicInteger T>
T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> val) {
  return fusedbn::simt::detail::record_atomic(address, [&] {
    std::atomic_ref<T>(*address).compare_exchange_strong(compare, val);
    return compare;  // holds the old value whether or not the exchange happened
  });
}
// old >= limit ? 0 : old + 1, in one atomic (CUDA's wrapping increment).
inline unsigned atomicInc(unsigned* address, unsigned limit) {
  return fusedbn::simt::detail::record_atomic(address, [&] {
    std::atomic_ref<unsigned> a(*address);
    unsigned old = a.load();
    while (!a.compare_exchange_weak(old, old >= limit ? 0u : old + 1u)) {
    }
    return old;
  });
}
template <typename T>
  requires std::is_same_v<T, int> || std::is_same_v<T, unsigned>
T atomicExch(T* address, std::type_identity_t<T> val) {
  return fusedbn::simt::detail::record_atomic(address, [&] { return std::atomic_ref<T>(*address).exchange(val); });
}
