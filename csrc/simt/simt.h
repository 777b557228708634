// SIMT emulator: lets kernel source written in a small CUDA subset compile as host C++20 and run on the
// CPU, one real OS thread per CUDA thread, so CI machines without a GPU execute the real kernel code.
//
// Include this header before any kernel source. What is emulated:
//   * threadIdx / blockIdx / blockDim / gridDim, __syncthreads, warp shuffles (full mask), atomics,
//     __threadfence, static __shared__ arrays, and a launcher with CUDA's launch-size checks.
// Execution model and its limits (a kernel author must respect these):
//   * Blocks of a launch run one after another (x fastest, then y, then z); the threads of one block run
//     truly concurrently. Launches are serialized process-wide. So kernels must not spin-wait on other
//     blocks (inter-block communication only through "last block finishes the job" patterns).
//   * `__shared__` is `static`: one copy per function (per template instantiation) shared by every block
//     and every launch. It is NOT zeroed at block start (it keeps the previous block's values), it cannot
//     have initializers, and `extern __shared__` (dynamic shared memory) is not supported.
//   * Block sizes must be a multiple of 32 (<= 1024), so every warp is full; shuffles accept only the
//     full mask 0xffffffff and all 32 lanes must call them.
//   * A __syncthreads (or shuffle) that not every thread reaches is reported, not hung: it throws
//     "simt: __syncthreads deadlock: ..." as soon as the missing threads have exited, or after a timeout
//     (10 s, env FUSEDBN_SIMT_TIMEOUT_S, or set_timeout_seconds). The first exception any emulated
//     thread throws is rethrown by the launch, after every thread of the block has been released.
#pragma once

#if defined(__CUDACC__)
#error "simt.h is the host emulation of CUDA; do not include it in nvcc builds"
#endif

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ---- CUDA keywords: every function is a host function here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so a function-local static acts as the running block's shared memory.
#define __shared__ static

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

inline std::atomic<double>& timeout_storage() {
  static std::atomic<double> seconds{[] {
    const char* env = std::getenv("FUSEDBN_SIMT_TIMEOUT_S");
    const double s = env ? std::strtod(env, nullptr) : 0.0;
    return s > 0 ? s : 10.0;
  }()};
  return seconds;
}
// How long a barrier waits for the rest of its threads before declaring a deadlock.
inline void set_timeout_seconds(double s) { timeout_storage().store(s > 0 ? s : 10.0); }
inline double timeout_seconds() { return timeout_storage().load(); }

namespace detail {

inline std::string seconds_str(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

// A reusable barrier for `count` threads that can fail instead of hanging: on timeout, or once the
// threads that have exited the kernel make completion impossible, it becomes "broken" and every current
// and future waiter throws the same message.
class Barrier {
 public:
  void reset(unsigned count, const char* what) {
    std::lock_guard lk(m_);
    count_ = count, arrived_ = 0, exited_ = 0, what_ = what, broken_.clear();
  }

  void wait() {
    std::unique_lock lk(m_);
    throw_if_broken();
    const uint64_t gen = generation_;
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
        fail("simt: " + what_ + " deadlock: only " + std::to_string(arrived_) + " of " +
             std::to_string(count_) + " threads arrived within " + seconds_str(timeout_seconds()) +
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
           " threads wait at a barrier that the other " + std::to_string(exited_) +
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
  std::string what_, broken_;
};

// Everything the threads of the running block share.
struct Warp {
  Barrier barrier;
  uint64_t slots[2][32];  // shuffle exchange buffers (used alternately), one value (<= 8 bytes) per lane
};
struct Block {
  dim3 idx;
  Barrier barrier;
  std::vector<Warp> warps;
  std::mutex error_mutex;
  std::exception_ptr error;

  explicit Block(unsigned threads) : warps(threads / 32) {}
  void start(dim3 block_idx, unsigned threads) {
    idx = block_idx;
    barrier.reset(threads, "__syncthreads");
    for (Warp& w : warps) w.barrier.reset(32, "warp shuffle");
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

struct ThreadContext {
  Block* block = nullptr;
  unsigned linear = 0;  // threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y
  unsigned shuffles = 0;  // shuffles this thread has done in this block: picks the exchange buffer
};
inline thread_local ThreadContext context;

inline ThreadContext& current(const char* what) {
  if (!context.block) throw std::logic_error(std::string("simt: ") + what + " called outside a kernel launch");
  return context;
}

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

inline Pool& pool() {
  static Pool p;  // destroyed at exit, which stops and joins the workers
  return p;
}
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline void validate(dim3 grid, dim3 block, size_t dynamic_smem_bytes) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("simt: " + msg); };
  auto str = [](dim3 d) {
    return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
  };
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

// Runs `body` (the kernel call) on every thread of every block; rethrows the first failure.
inline void run_grid(dim3 grid, dim3 dim, const std::function<void()>& body) {
  std::lock_guard launch_lock(launch_mutex());
  const unsigned threads = dim.x * dim.y * dim.z;
  Block block(threads);
  const std::function<void(unsigned)> thread_main = [&](unsigned i) {
    threadIdx = dim3(i % dim.x, i / dim.x % dim.y, i / (dim.x * dim.y));
    blockIdx = block.idx, blockDim = dim, gridDim = grid;
    context = {&block, i};
    try {
      body();
    } catch (...) {
      block.fail(std::current_exception());
    }
    block.barrier.exit();
    block.warps[i / 32].barrier.exit();
    context = {};
  };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block.start(dim3(x, y, z), threads);
        pool().run(threads, thread_main);
        if (block.error) std::rethrow_exception(block.error);
      }
}

// Converts launch arguments to the kernel's parameter types exactly like a function call would.
template <typename... P>
std::tuple<std::decay_t<P>...> as_params(std::type_identity_t<P>... args) {
  return {args...};
}

// A value of type T travels through the warp's exchange buffer: write, wait for all lanes, read the
// source lane. Consecutive shuffles alternate between two buffers, so the barrier of the next shuffle is
// also the "everyone has read" wait that must precede rewriting this buffer: a lane can only reach the
// shuffle after next once every lane has arrived at the next one, i.e. has finished reading this one.
template <typename T, typename SourceLane>
T exchange(unsigned mask, T value, int width, SourceLane source_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
  ThreadContext& c = current("warp shuffle");
  if (mask != 0xffffffffu) throw std::runtime_error("simt: only the full warp mask 0xffffffff is supported");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    throw std::runtime_error("simt: shuffle width " + std::to_string(width) + " is not a power of two <= 32");
  Warp& w = c.block->warps[c.linear / 32];
  const unsigned lane = c.linear % 32, segment = lane & ~unsigned(width - 1);
  uint64_t* slots = w.slots[c.shuffles++ % 2];
  std::memcpy(&slots[lane], &value, sizeof(T));
  w.barrier.wait();
  T out;
  std::memcpy(&out, &slots[source_lane(lane, segment) % 32], sizeof(T));
  return out;
}

}  // namespace detail

// Kernel launches since the process started (a test reads it to check the ops' launch budget).
inline std::atomic<uint64_t>& launch_count() {
  static std::atomic<uint64_t> count{0};
  return count;
}

// launch(kernel, grid, block, smem)(args...) runs the whole grid synchronously (see the top of file).
template <typename... KArgs>
auto launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t dynamic_smem_bytes) {
  detail::validate(grid, block, dynamic_smem_bytes);
  ++launch_count();
  return [kernel, grid, block](auto&&... args) {
    static_assert(sizeof...(args) == sizeof...(KArgs), "wrong number of kernel arguments");
    auto params = detail::as_params<KArgs...>(std::forward<decltype(args)>(args)...);
    detail::run_grid(grid, block, [&] { std::apply(kernel, params); });
  };
}

}  // namespace fusedbn::simt

// The kernels' launch macro (csrc/cuda/launch.h) under the emulator: the grid runs here, synchronously, and
// there is no CUDA error state to check.
#define FUSEDBN_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::fusedbn::simt::launch(kernel, grid, block, shared_bytes)
#define FUSEDBN_LAUNCH_CHECK() ((void)0)

// ---- Device functions, in the global namespace like CUDA's.

inline void __syncthreads() { fusedbn::simt::detail::current("__syncthreads").block->barrier.wait(); }
// Barriers and atomics already order memory on the host; a fence keeps the CUDA meaning regardless.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Lanes outside [segment, segment + width) are not reachable; such reads return the caller's own value.
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return fusedbn::simt::detail::exchange(mask, var, width, [&](unsigned, unsigned segment) {
    return segment + (unsigned(src_lane) & unsigned(width - 1));
  });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return fusedbn::simt::detail::exchange(mask, var, width, [&](unsigned lane, unsigned segment) {
    return uint64_t(lane - segment) + delta < unsigned(width) ? lane + delta : lane;
  });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return fusedbn::simt::detail::exchange(mask, var, width, [&](unsigned lane, unsigned segment) {
    return lane - segment >= delta ? lane - delta : lane;
  });
}
// Butterfly: lanes of earlier segments are reachable, later ones are not (CUDA's rule).
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return fusedbn::simt::detail::exchange(mask, var, width, [&](unsigned lane, unsigned segment) {
    const unsigned src = lane ^ unsigned(lane_mask);
    return src < segment + unsigned(width) ? src : lane;
  });
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
  return std::atomic_ref<T>(*address).fetch_add(val);
}
template <SimtAtomicInteger T>
T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> val) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, val);
  return compare;  // holds the old value whether or not the exchange happened
}
template <typename T>
  requires std::is_same_v<T, int> || std::is_same_v<T, unsigned>
T atomicExch(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).exchange(val);
}

