// Self-tests of the SIMT emulator (simt.h): small kernels written as CUDA, run on CPU tensors through
// TORCH_LIBRARY(fusedbn_simt_selftest) ops. Built only by tests/test_simt_emulator.py.
#include "simt.h"

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- block_sum: shuffles + shared memory + __syncthreads, then "last block sums the partials".

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

__global__ void __launch_bounds__(1024) block_sum_kernel(const float* __restrict__ x, int64_t n, int64_t chunk,
                                                         float* partials, unsigned* blocks_done, float* total) {
  __shared__ float warp_sums[32];
  __shared__ bool is_last;
  const unsigned tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;
  const int64_t begin = blockIdx.x * chunk, end = std::min(n, begin + chunk);
  float v = 0;
  for (int64_t i = begin + tid; i < end; i += blockDim.x) v += x[i];
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_sum(lane < warps ? warp_sums[lane] : 0.0f);
    if (lane == 0) {
      partials[blockIdx.x] = v;
      __threadfence();  // the partial must be visible before the counter announces it
      is_last = atomicAdd(blocks_done, 1) == gridDim.x - 1;
    }
  }
  __syncthreads();
  if (is_last && tid == 0) {
    __threadfence();
    float s = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) s += partials[b];
    *total = s;
  }
}

std::tuple<at::Tensor, at::Tensor> block_sum(const at::Tensor& x_in, int64_t block_threads) {
  TORCH_CHECK(x_in.dim() == 1 && x_in.scalar_type() == at::kFloat, "block_sum: 1-D float32 input expected");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel(), chunk = 4 * block_threads;
  const int64_t blocks = std::max<int64_t>(1, (n + chunk - 1) / chunk);
  at::Tensor partials = at::empty({blocks}, x.options()), total = at::zeros({1}, x.options());
  unsigned blocks_done = 0;
  FUSEDBN_LAUNCH(&block_sum_kernel, blocks, block_threads, 0, nullptr)(
      x.data_ptr<float>(), n, chunk, partials.data_ptr<float>(), &blocks_done, total.data_ptr<float>());
  return {total, partials};
}

// ---- racy_sum: thread 0 reads what the others wrote; only the barrier makes that correct.

__global__ void racy_sum_kernel(const float* x, bool with_barrier, float* out) {
  // Deliberately racy without the barrier; volatile keeps the compiler from caching the reads.
  __shared__ volatile float values[64];
  const unsigned tid = threadIdx.x;
  // Slow writers: without the barrier, thread 0 sums long before they write.
  if (tid != 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  values[tid] = x[tid];
  if (with_barrier) __syncthreads();
  if (tid == 0) {
    float s = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) s += values[i];
    *out = s;
  }
  __syncthreads();
  // Shared memory outlives the block: wipe it so the next launch cannot read this one's values.
  values[tid] = 0;
}

at::Tensor racy_sum(const at::Tensor& x_in, bool with_barrier) {
  TORCH_CHECK(x_in.numel() == 64 && x_in.scalar_type() == at::kFloat, "racy_sum: 64 float32 values expected");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::zeros({1}, x.options());
  FUSEDBN_LAUNCH(&racy_sum_kernel, 1, 64, 0, nullptr)(x.data_ptr<float>(), with_barrier, out.data_ptr<float>());
  return out;
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
    default: TORCH_CHECK(false, "shuffle: unsupported dtype ", x.scalar_type());
  }
  return out;
}

// ---- divergent_barrier: kernels that must fail cleanly instead of hanging.

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
  }
}

void divergent_barrier(std::string mode, double timeout_s) {
  const std::vector<std::string> modes = {"exit", "stall", "shuffle", "throw"};
  const auto it = std::find(modes.begin(), modes.end(), mode);
  TORCH_CHECK(it != modes.end(), "divergent_barrier: unknown mode ", mode);
  const double saved = fusedbn::simt::timeout_seconds();
  fusedbn::simt::set_timeout_seconds(timeout_s);
  try {
    FUSEDBN_LAUNCH(&divergent_kernel, 2, 64, 0, nullptr)(static_cast<int>(it - modes.begin()));
  } catch (...) {
    fusedbn::simt::set_timeout_seconds(saved);
    throw;
  }
  fusedbn::simt::set_timeout_seconds(saved);
}

// ---- indices: every thread records its built-in variables; thread 0 also the order its block ran in.

__global__ void indices_kernel(int64_t* rows, unsigned long long* blocks_started) {
  __shared__ unsigned long long order;
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  const unsigned b = blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
  if (t == 0) order = atomicAdd(blocks_started, 1ull);
  __syncthreads();
  int64_t* row = rows + (int64_t(b) * threads + t) * 13;
  const dim3 dims[] = {threadIdx, blockIdx, blockDim, gridDim};
  for (int k = 0; k < 4; ++k) row[3 * k] = dims[k].x, row[3 * k + 1] = dims[k].y, row[3 * k + 2] = dims[k].z;
  row[12] = static_cast<int64_t>(order);
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
  m.def("block_sum(Tensor x, int block_threads) -> (Tensor, Tensor)", &block_sum);
  m.def("racy_sum(Tensor x, bool with_barrier) -> Tensor", &racy_sum);
  m.def("shuffle(Tensor x, str kind, int arg, int width=32) -> Tensor", &shuffle);
  m.def("divergent_barrier(str mode, float timeout_s) -> ()", &divergent_barrier);
  m.def("indices(int[] grid, int[] block, int smem=0) -> Tensor", &indices);
  m.def("bad_block(int threads) -> ()", &bad_block);
  m.def("atomics(int blocks, int threads) -> Tensor", &atomics);
}

// Importing the module is what loads the library and so registers the ops above.
extern "C" PyObject* PyInit__simt_selftest(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_simt_selftest", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
