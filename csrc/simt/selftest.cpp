// Self-tests of the SIMT emulator (simt.h) and its sanitizer: small kernels written as CUDA, run on CPU
// tensors through TORCH_LIBRARY(fusedbn_simt_selftest) ops. Each check of the sanitizer has a kernel here
// with a deliberately planted bug (a `Bug` argument) that the check must report, beside the correct
// kernel, which must pass. Built only by tests/test_simt_emulator.py.
#include "simt.h"

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "host_checks.h"
#include "python_controls.h"

namespace {

using fusedbn::simt::BlockPartials;
using fusedbn::simt::Global;
using fusedbn::simt::Restrict;
using fusedbn::simt::SharedArray;

constexpr unsigned kFullMask = 0xffffffffu;

// The bug a kernel plants, by name (tests/test_simt_emulator.py passes the names).
int bug_index(const std::string& bug, const std::vector<std::string>& names) {
  const auto it = std::find(names.begin(), names.end(), bug);
  TORCH_CHECK(it != names.end(), "unknown bug '", bug, "'");
  return static_cast<int>(it - names.begin());
}

// ---- block_sum: shuffles + shared memory + __syncthreads, then "last block sums the partials" through an
// arrival counter, as kernels.cuh's grid merge does. Planted bugs, one per check of the protocol:
enum class SumBug {
  none,
  unwritten_shared,   // warp 0 reads all 32 warp sums, most never written (poisoned shared memory, initcheck)
  no_writer_fence,    // a block arrives without fencing its partial (cross-block ordering)
  no_reader_fence,    // the last block reads the partials without a fence after its arrival (cross-block)
  no_counter_reset,   // the last block leaves the counter at gridDim.x (counters at rest)
  fixed_last_block,   // block gridDim.x - 1 assumes it runs last, no counter (block order)
};
const std::vector<std::string> kSumBugs = {"none", "unwritten_shared", "no_writer_fence", "no_reader_fence",
                                           "no_counter_reset", "fixed_last_block"};

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

__global__ void __launch_bounds__(1024) block_sum_kernel(const float* __restrict__ x, int64_t n, int64_t chunk,
                                                         BlockPartials<float> partials, unsigned* blocks_done,
                                                         float* total, SumBug bug) {
  __shared__ SharedArray<float, 32> warp_sums;
  __shared__ SharedArray<bool, 1> is_last;
  const unsigned tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;
  const int64_t begin = blockIdx.x * chunk, end = std::min(n, begin + chunk);
  float v = 0;
  for (int64_t i = begin + tid; i < end; i += blockDim.x) v += x[i];
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_sum(bug == SumBug::unwritten_shared || lane < warps ? static_cast<float>(warp_sums[lane]) : 0.0f);
    if (lane == 0) {
      partials[blockIdx.x] = v;
      if (bug != SumBug::no_writer_fence) __threadfence();  // the partial is visible before the counter says so
      if (bug == SumBug::fixed_last_block) {
        is_last[0] = blockIdx.x == gridDim.x - 1;
      } else {
        is_last[0] = atomicAdd(blocks_done, 1) == gridDim.x - 1;
        if (is_last[0] && bug != SumBug::no_counter_reset) *blocks_done = 0;
      }
    }
  }
  __syncthreads();
  if (is_last[0] && tid == 0) {
    if (bug != SumBug::no_reader_fence) __threadfence();
    float s = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) s += partials[b];
    *total = s;
  }
}

// The counter lives in a registered tensor, as the ops' scratch counters do, and is checked at rest after.
std::tuple<at::Tensor, at::Tensor> block_sum(const at::Tensor& x_in, int64_t block_threads, std::string bug) {
  TORCH_CHECK(x_in.dim() == 1 && x_in.scalar_type() == at::kFloat, "block_sum: 1-D float32 input expected");
  const SumBug b = static_cast<SumBug>(bug_index(bug, kSumBugs));
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel(), chunk = 4 * block_threads;
  const int64_t blocks = std::max<int64_t>(1, (n + chunk - 1) / chunk);
  at::Tensor partials, total = at::zeros({1}, x.options());
  const at::Tensor counter = at::zeros({1}, x.options().dtype(at::kInt));
  {
    const fusedbn::simt::PoisonAllocations poisoned;
    partials = at::empty({blocks}, x.options());
  }
  fusedbn::simt::register_counters(counter);
  FUSEDBN_LAUNCH(&block_sum_kernel, blocks, block_threads, 0, nullptr)(
      x.data_ptr<float>(), n, chunk, BlockPartials<float>{partials.data_ptr<float>()},
      reinterpret_cast<unsigned*>(counter.data_ptr<int>()), total.data_ptr<float>(), b);
  fusedbn::simt::check_counters_at_rest("block_sum");
  return {total, partials};
}

// ---- shared_exchange: each thread publishes a value in shared memory and reads its neighbour's (and the
// next round overwrites them), with the ordering each planted bug leaves out (racecheck):
enum class ExchangeBug {
  none,
  no_barrier,        // read after write with no barrier between
  no_second_barrier, // the next round's write races with this round's read (write after read)
  same_element,      // every thread writes element 0 (write after write)
  warp_sync,         // neighbours within a warp, ordered by __syncwarp: correct
  warp_shuffle_only, // neighbours within a warp, "ordered" by a shuffle: shuffles order only their values
};
const std::vector<std::string> kExchangeBugs = {"none", "no_barrier", "no_second_barrier", "same_element", "warp_sync",
                                                "warp_shuffle_only"};

__global__ void shared_exchange_kernel(const float* x, float* out, ExchangeBug bug) {
  __shared__ SharedArray<float, 64> values;
  const unsigned tid = threadIdx.x, n = blockDim.x;
  const bool in_warp = bug == ExchangeBug::warp_sync || bug == ExchangeBug::warp_shuffle_only;
  const unsigned neighbour = in_warp ? (tid & ~31u) | ((tid + 1) % 32) : (tid + 1) % n;
  float acc = 0;
  // The planted races sleep where that makes the unordered access come second in real time too, so the
  // report names the race it plants (the sanitizer reports it either way, as a race or an unwritten read).
  auto settle = [] { std::this_thread::sleep_for(std::chrono::milliseconds(5)); };
  for (int round = 0; round < 2; ++round) {
    if (round == 1 && bug == ExchangeBug::no_second_barrier) settle();
    values[bug == ExchangeBug::same_element ? 0 : tid] = x[tid] + round;
    if (bug == ExchangeBug::no_barrier) settle();
    if (bug == ExchangeBug::warp_sync) __syncwarp();
    else if (bug == ExchangeBug::warp_shuffle_only) (void)__shfl_xor_sync(kFullMask, 0, 1);
    else if (bug != ExchangeBug::no_barrier) __syncthreads();
    acc += values[neighbour];
    if (bug == ExchangeBug::warp_sync || bug == ExchangeBug::warp_shuffle_only) __syncwarp();
    else if (bug != ExchangeBug::no_second_barrier && bug != ExchangeBug::no_barrier) __syncthreads();
  }
  out[tid] = acc;
}

at::Tensor shared_exchange(const at::Tensor& x_in, std::string bug) {
  TORCH_CHECK(x_in.numel() == 64 && x_in.scalar_type() == at::kFloat, "shared_exchange: 64 float32 values expected");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::zeros({64}, x.options());
  FUSEDBN_LAUNCH(&shared_exchange_kernel, 1, 64, 0, nullptr)(x.data_ptr<float>(), out.data_ptr<float>(),
                                                          static_cast<ExchangeBug>(bug_index(bug, kExchangeBugs)));
  return out;
}

// ---- shared_bounds: an index past the end of a shared array, and a block over the static limit.

__global__ void shared_bounds_kernel(int index, bool too_big) {
  __shared__ SharedArray<double, 32> small;
  __shared__ SharedArray<double, 8192> big;  // 64 KB: over the 48 KB a block may declare statically
  if (too_big) big[threadIdx.x] = 0;
  small[threadIdx.x % 32 + index] = 1.0;
}

void shared_bounds(int64_t index, bool too_big) {
  FUSEDBN_LAUNCH(&shared_bounds_kernel, 1, 32, 0, nullptr)(static_cast<int>(index), too_big);
}

// ---- poisoned_output: out[i] = 2 * x[i], except where the planted bug skips the last value, which then
// holds the poison (NaN), not what an earlier call left in memory the allocator hands back.

__global__ void poisoned_output_kernel(const float* x, float* out, int64_t n, bool skip_last) {
  for (int64_t i = threadIdx.x; i < n - (skip_last ? 1 : 0); i += blockDim.x) out[i] = 2 * x[i];
}

at::Tensor poisoned_output(const at::Tensor& x_in, bool skip_last) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out;
  {
    const fusedbn::simt::PoisonAllocations poisoned;
    out = at::empty_like(x);
  }
  FUSEDBN_LAUNCH(&poisoned_output_kernel, 1, 32, 0, nullptr)(x.data_ptr<float>(), out.data_ptr<float>(), x.numel(),
                                                           skip_last);
  return out;
}

// ---- restrict_alias: thread 0 of each block writes its block's statistic through a plain pointer, then
// every thread reads it back: through that pointer (correct), or, the planted bug, through a __restrict__
// pointer to the same memory, which promises the compiler that nothing else writes it during the launch
// (kernels.cuh's one-launch forward once read its mean and invstd that way).

__global__ void restrict_alias_kernel(Restrict<const float> x, Global<float> stats, Restrict<const float> stats_in,
                                      Restrict<float> y, bool through_restrict) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (threadIdx.x == 0) stats[blockIdx.x] = 2 * x[blockIdx.x];
  __syncthreads();
  y[i] = through_restrict ? stats_in[blockIdx.x] : static_cast<float>(stats[blockIdx.x]);
}

at::Tensor restrict_alias(const at::Tensor& x_in, bool through_restrict) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor stats = at::empty_like(x), y = at::empty({x.numel() * 32}, x.options());
  FUSEDBN_LAUNCH(&restrict_alias_kernel, x.numel(), 32, 0, nullptr)(
      x.data_ptr<float>(), stats.data_ptr<float>(), stats.data_ptr<float>(), y.data_ptr<float>(), through_restrict);
  return y;
}

// ---- shuffle: one block, out[i] = shuffle of x over the block's warps. Parameters travel as a struct.

enum class ShuffleKind { down, up, xor_, idx };
struct ShuffleArgs {
  ShuffleKind kind;
  int arg;
  int width;
};

template <typename T>
__global__ void shuffle_kernel(const T* x, T* out, ShuffleArgs a) {
  const unsigned i = threadIdx.x;
  const T v = x[i];
  T r{};
  switch (a.kind) {
    case ShuffleKind::down: r = __shfl_down_sync(kFullMask, v, a.arg, a.width); break;
    case ShuffleKind::up: r = __shfl_up_sync(kFullMask, v, a.arg, a.width); break;
    case ShuffleKind::xor_: r = __shfl_xor_sync(kFullMask, v, a.arg, a.width); break;
    case ShuffleKind::idx: r = __shfl_sync(kFullMask, v, a.arg, a.width); break;
  }
  out[i] = r;
}

template <typename T>
void run_shuffle(const at::Tensor& x, at::Tensor& out, ShuffleArgs a) {
  FUSEDBN_LAUNCH(&shuffle_kernel<T>, 1, x.numel(), 0, nullptr)(x.data_ptr<T>(), out.data_ptr<T>(), a);
}

at::Tensor shuffle(const at::Tensor& x_in, std::string kind, int64_t arg, int64_t width) {
  TORCH_CHECK(x_in.dim() == 1, "shuffle: 1-D input expected");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  ShuffleArgs a{ShuffleKind::down, static_cast<int>(arg), static_cast<int>(width)};
  if (kind == "up") a.kind = ShuffleKind::up;
  else if (kind == "xor") a.kind = ShuffleKind::xor_;
  else if (kind == "idx") a.kind = ShuffleKind::idx;
  else TORCH_CHECK(kind == "down", "shuffle: unknown kind ", kind);
  switch (x.scalar_type()) {
    case at::kFloat: run_shuffle<float>(x, out, a); break;
    case at::kDouble: run_shuffle<double>(x, out, a); break;
    case at::kInt: run_shuffle<int>(x, out, a); break;
    case at::kLong: run_shuffle<int64_t>(x, out, a); break;
    default: TORCH_CHECK(false, "shuffle: unknown dtype ", x.scalar_type());
  }
  return out;
}

// ---- divergent_barrier: barriers and shuffles not reached alike by the threads (synccheck), which must
// fail cleanly instead of hanging or passing.
const std::vector<std::string> kDivergentModes = {"exit", "stall", "shuffle", "throw", "two_barriers",
                                                  "two_shuffles", "partial_mask"};

__global__ void divergent_kernel(int mode) {
  const unsigned tid = threadIdx.x;
  switch (mode) {
    case 0:  // half the block exits, the other half waits at a barrier
      if (tid % 2 == 0) __syncthreads();
      break;
    case 1:  // half the block is busy elsewhere for longer than the timeout
      if (tid % 2 == 0) __syncthreads();
      else std::this_thread::sleep_for(std::chrono::duration<double>(2 * fusedbn::simt::timeout_seconds()));
      break;
    case 2:  // half of each warp skips a shuffle
      if (tid % 32 >= 16) (void)__shfl_xor_sync(kFullMask, 1, 1);
      break;
    case 3:  // one thread throws while the others wait: its exception is the one reported
      if (tid == 5) throw std::runtime_error("selftest: thread 5 threw");
      __syncthreads();
      __syncthreads();
      break;
    case 4:  // every thread reaches a barrier, but not the same one
      if (tid % 2 == 0) __syncthreads();
      else __syncthreads();
      break;
    case 5:  // every lane shuffles, but at two different shuffles
      if (tid % 2 == 0) (void)__shfl_xor_sync(kFullMask, 1, 1);
      else (void)__shfl_xor_sync(kFullMask, 2, 1);
      break;
    case 6:  // a mask that leaves lanes out
      (void)__shfl_xor_sync(0x0000ffffu, 1, 1);
      break;
  }
}

void divergent_barrier(std::string mode, double timeout_s) {
  const int m = bug_index(mode, kDivergentModes);
  const double saved = fusedbn::simt::timeout_seconds();
  fusedbn::simt::set_timeout_seconds(timeout_s);
  try {
    FUSEDBN_LAUNCH(&divergent_kernel, 2, 64, 0, nullptr)(m);
  } catch (...) {
    fusedbn::simt::set_timeout_seconds(saved);
    throw;
  }
  fusedbn::simt::set_timeout_seconds(saved);
}

// ---- indices: every thread records its built-in variables; thread 0 also the order its block started in.

__global__ void indices_kernel(int64_t* rows, unsigned long long* blocks_started) {
  __shared__ SharedArray<unsigned long long, 1> order;
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  const unsigned b = blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
  if (t == 0) order[0] = atomicAdd(blocks_started, 1ull);
  __syncthreads();
  int64_t* row = rows + (int64_t(b) * threads + t) * 13;
  const dim3 dims[] = {threadIdx, blockIdx, blockDim, gridDim};
  for (int k = 0; k < 4; ++k) row[3 * k] = dims[k].x, row[3 * k + 1] = dims[k].y, row[3 * k + 2] = dims[k].z;
  row[12] = static_cast<int64_t>(order[0]);
}

at::Tensor indices(std::vector<int64_t> grid, std::vector<int64_t> block, int64_t smem) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "indices: grid and block are [x, y, z]");
  const dim3 g(grid[0], grid[1], grid[2]), b(block[0], block[1], block[2]);
  auto launch = FUSEDBN_LAUNCH(&indices_kernel, g, b, smem, nullptr);  // validates before allocating
  at::Tensor rows = at::full({grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2], 13}, -1, at::kLong);
  unsigned long long blocks_started = 0;
  launch(rows.data_ptr<int64_t>(), &blocks_started);
  return rows;
}

// ---- blocks_in_flight: each block's thread 0 counts the blocks running when it starts, then lingers.

__global__ void in_flight_kernel(int* running, int* seen) {
  if (threadIdx.x != 0) return;
  seen[blockIdx.x] = atomicAdd(running, 1) + 1;
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  atomicAdd(running, -1);
}

at::Tensor blocks_in_flight(int64_t blocks) {
  at::Tensor seen = at::zeros({blocks}, at::kInt);
  int running = 0;
  FUSEDBN_LAUNCH(&in_flight_kernel, blocks, 32, 0, nullptr)(&running, seen.data_ptr<int>());
  return seen;
}

__global__ void noop_kernel() {}

void bad_block(int64_t threads) { FUSEDBN_LAUNCH(&noop_kernel, 1, threads, 0, nullptr)(); }

// ---- atomics: every atomic the emulator provides, hammered by a whole grid.

struct Cells {
  int i = 0;
  unsigned u = 0;
  unsigned long long ull = 0;
  float f = 0;
  double d = 0;
  int cas = 0;
  unsigned cas_u = 0;
  int exch = 0;
  unsigned long long exch_olds = 0;
};

__global__ void atomics_kernel(Cells* c) {
  const int id = blockIdx.x * blockDim.x + threadIdx.x + 1;
  atomicAdd(&c->i, 1);
  atomicAdd(&c->u, 3);
  atomicAdd(&c->ull, 5);
  atomicAdd(&c->f, 0.5f);
  atomicAdd(&c->d, 0.25);
  // CAS loops starting from a guess: a failed CAS returns the current value to retry with.
  int old = 0, assumed;
  do {
    assumed = old;
    old = atomicCAS(&c->cas, assumed, assumed + 2);
  } while (old != assumed);
  unsigned old_u = 0, assumed_u;
  do {
    assumed_u = old_u;
    old_u = atomicCAS(&c->cas_u, assumed_u, assumed_u + 1);
  } while (old_u != assumed_u);
  atomicAdd(&c->exch_olds, static_cast<unsigned long long>(atomicExch(&c->exch, id)));
}

at::Tensor atomics(int64_t blocks, int64_t threads) {
  Cells c;
  FUSEDBN_LAUNCH(&atomics_kernel, blocks, threads, 0, nullptr)(&c);
  // exch_olds + the last value left in the slot = sum of every id, whatever the order.
  return at::tensor({double(c.i), double(c.u), double(c.ull), double(c.f), c.d, double(c.cas), double(c.cas_u),
                     double(c.exch_olds + c.exch)},
                    at::kDouble);
}

}  // namespace

TORCH_LIBRARY(fusedbn_simt_selftest, m) {
  m.def("block_sum(Tensor x, int block_threads, str bug='none') -> (Tensor, Tensor)", &block_sum);
  m.def("shared_exchange(Tensor x, str bug='none') -> Tensor", &shared_exchange);
  m.def("shared_bounds(int index, bool too_big) -> ()", &shared_bounds);
  m.def("poisoned_output(Tensor x, bool skip_last) -> Tensor", &poisoned_output);
  m.def("restrict_alias(Tensor x, bool through_restrict) -> Tensor", &restrict_alias);
  m.def("shuffle(Tensor x, str kind, int arg, int width=32) -> Tensor", &shuffle);
  m.def("divergent_barrier(str mode, float timeout_s) -> ()", &divergent_barrier);
  m.def("indices(int[] grid, int[] block, int smem=0) -> Tensor", &indices);
  m.def("blocks_in_flight(int blocks) -> Tensor", &blocks_in_flight);
  m.def("bad_block(int threads) -> ()", &bad_block);
  m.def("atomics(int blocks, int threads) -> Tensor", &atomics);
}

// Importing the module is what loads the library and so registers the ops above; its functions are the
// emulator's settings (python_controls.h).
namespace {
PyMethodDef methods[] = {FUSEDBN_SIMT_PYTHON_CONTROLS, {nullptr, nullptr, 0, nullptr}};
}

extern "C" PyObject* PyInit__simt_selftest(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_simt_selftest", nullptr, -1, methods};
  return PyModule_Create(&module);
}
