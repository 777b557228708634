// Scratch memory of the CUDA ops, reused across calls so that an op allocates nothing but its outputs:
// the reductions' arrival counters (zeroed once, when allocated, and reset by the block that finishes
// last: kernels.cuh last_block_of_group), the blocks' partials and the backward's per-channel terms,
// which its second kernel reads.
//
// One per (host thread, device, stream). Work on one stream runs in order, so one thread's consecutive ops
// may reuse it; another thread may interleave its own kernels on the same stream (between a backward's two
// kernels, say), so it gets its own. Under CUDA-graph capture an op allocates its own instead, from the
// graph's pool (the counters zeroed by a memset node of the graph), so a graph never shares scratch with
// eager work or with another graph.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <map>

namespace fusedbn::cuda {

struct Scratch {
  at::Tensor counters;  // int32, zero between launches
  at::Tensor bytes;     // uninitialized, 16-byte aligned

  unsigned* counter_ptr() const { return counters.defined() ? reinterpret_cast<unsigned*>(counters.data_ptr()) : nullptr; }
  // The `offset`-th byte of `bytes` as a T* (offset a multiple of 16).
  template <typename T>
  T* at(int64_t offset) const {
    return bytes.defined() ? reinterpret_cast<T*>(static_cast<char*>(bytes.data_ptr()) + offset) : nullptr;
  }
};

inline int64_t round_up16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// At least `counters` zeroed counters and `bytes` bytes on the device of `like`, for the current stream
// (ctx.scratch_key() names it; ctx.capturing() says whether it is being captured). The returned tensors
// keep the memory alive while the op uses it.
template <typename Context>
Scratch scratch(const Context& ctx, const at::Tensor& like, int64_t counters, int64_t bytes) {
  auto make_counters = [&](int64_t n) { return at::zeros({n}, like.options().dtype(at::kInt)); };
  auto make_bytes = [&](int64_t n) { return at::empty({n}, like.options().dtype(at::kByte)); };
  if (ctx.capturing()) {
    const Scratch fresh{make_counters(counters), make_bytes(bytes)};
    ctx.on_scratch(fresh);
    return fresh;
  }
  thread_local std::map<decltype(ctx.scratch_key()), Scratch> cache;
  Scratch& s = cache[ctx.scratch_key()];
  // Grown by doubling, so a sequence of growing shapes reallocates a few times only. The old tensors are
  // released on the stream they were used on, so the allocator reuses them only after those kernels.
  if (counters > (s.counters.defined() ? s.counters.numel() : 0)) {
    s.counters = make_counters(std::max<int64_t>(counters, 2 * (s.counters.defined() ? s.counters.numel() : 0)));
  }
  if (bytes > (s.bytes.defined() ? s.bytes.numel() : 0)) {
    s.bytes = make_bytes(std::max<int64_t>(bytes, 2 * (s.bytes.defined() ? s.bytes.numel() : 0)));
  }
  ctx.on_scratch(s);
  return s;
}

}  // namespace fusedbn::cuda
