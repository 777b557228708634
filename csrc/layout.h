// How an (N, C, *) tensor is laid out in memory, reduced to one of two 3-D views without copying:
//   channels-first (N, C, S): channel c of sample n is a contiguous run of S values;
//   channels-last  (N*S, C):  each row holds all C channels of one position (NHWC, NDHWC, and (N, C)).
// Host-side only; shared by every backend's host code.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

namespace fusedbn {

struct ChannelLayout {
  int64_t N = 0, C = 0, S = 0;
  bool channels_last = false;

  int64_t count_per_channel() const { return N * S; }
  // Rows of the 2-D view a kernel walks: samples (channels-first) or positions (channels-last).
  int64_t rows() const { return channels_last ? N * S : N; }
};

// t.movedim(1, -1).is_contiguous(), read from the strides without making the view: C innermost, then the
// spatial dims from the last, then N (a dim of size 1 may have any stride; an empty tensor is dense).
// Symbolic sizes too (the meta kernels under dynamic shapes).
inline bool is_channels_last_dense(const at::Tensor& t) {
  if (t.sym_numel() == 0) return true;
  c10::SymInt expected = 1;
  auto next = [&](int64_t d) {
    const bool dense = t.sym_size(d) == 1 || t.sym_stride(d) == expected;
    expected *= t.sym_size(d);
    return dense;
  };
  if (!next(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (!next(d)) return false;
  }
  return next(0);
}

inline ChannelLayout channel_layout(const at::Tensor& dense) {
  ChannelLayout layout;
  layout.N = dense.size(0);
  layout.C = dense.size(1);
  layout.S = dense.numel() / std::max<int64_t>(1, layout.N * layout.C);
  if (dense.numel() == 0) {
    layout.S = 1;
    for (int64_t d = 2; d < dense.dim(); ++d) layout.S *= dense.size(d);
  }
  // With one position per channel run the two views coincide; channels-last walks it with full-width rows.
  layout.channels_last = layout.S == 1 || !dense.is_contiguous();
  return layout;
}

// The input itself when it already is one of the two views, else one dense copy in the memory format
// torch would suggest for it (so a sliced NHWC tensor stays channels-last).
inline at::Tensor dense_input(const at::Tensor& x) {
  if (x.is_contiguous() || is_channels_last_dense(x)) return x;
  const auto format = x.suggest_memory_format();
  if (format != at::MemoryFormat::Contiguous) return x.contiguous(format);
  return x.contiguous();
}

// `t` (same sizes as the layout's tensor) arranged in the layout's view, copying only if it is not.
inline at::Tensor to_layout(const at::Tensor& t, const ChannelLayout& layout) {
  if (layout.channels_last) {
    return is_channels_last_dense(t) ? t : t.movedim(1, -1).contiguous().movedim(-1, 1);
  }
  return t.contiguous();
}

// A fresh tensor with the strides of `dense` (one of the two views: dense_input's result), so outputs and
// gradients keep the input's memory format, empty tensors included, and the kernels can write them in the
// input's order.
inline at::Tensor empty_like_dense(const at::Tensor& dense, at::ScalarType dtype) {
  return at::empty_like(dense, dense.options().dtype(dtype), at::MemoryFormat::Preserve);
}

}  // namespace fusedbn
