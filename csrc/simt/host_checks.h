// The sanitizer's host side, for the emulator's ops (tests only; simt.h checks the kernels themselves):
//   * poisoned memory: while a PoisonAllocations is alive on a thread, every CPU tensor that thread
//     allocates comes filled with 0xFF (a NaN in every float type, an absurd count or index in every
//     integer), and reused scratch is refilled (poison()), so a kernel that reads an output or scratch byte
//     it never wrote reads garbage that fails loudly, not the previous call's values;
//   * arrival counters at rest: every counter tensor an op used is registered, and must be back at zero
//     when the op returns (a counter left non-zero would make every later grid merge on that stream take
//     the wrong block as its last).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "simt.h"

namespace fusedbn::simt {

constexpr unsigned char kPoison = 0xFF;

inline void poison(void* data, size_t bytes) {
  if (data && bytes) std::memset(data, kPoison, bytes);
}

namespace detail {

inline thread_local int poisoning = 0;

// The process's CPU allocator with poisoning on the threads that ask for it; installed once, on first use.
class PoisoningAllocator final : public c10::Allocator {
 public:
  explicit PoisoningAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = base_->allocate(n);
    if (poisoning > 0) poison(p.get(), n);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter(); }
  bool is_simple_data_ptr(const c10::DataPtr& p) const override { return base_->is_simple_data_ptr(p); }
  void copy_data(void* dest, const void* src, std::size_t count) const override { base_->copy_data(dest, src, count); }

 private:
  c10::Allocator* base_;
};

inline void install_poisoning_allocator() {
  static const bool installed = [] {
    static PoisoningAllocator allocator(c10::GetCPUAllocator());
    c10::SetCPUAllocator(&allocator, /*priority=*/1);
    return true;
  }();
  (void)installed;
}

}  // namespace detail

struct PoisonAllocations {
  PoisonAllocations() {
    detail::install_poisoning_allocator();
    ++detail::poisoning;
  }
  ~PoisonAllocations() { --detail::poisoning; }
  PoisonAllocations(const PoisonAllocations&) = delete;
  PoisonAllocations& operator=(const PoisonAllocations&) = delete;
};

// ---- Arrival counters (int32 tensors, zero between launches).

namespace detail {
inline std::mutex& counters_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<at::Tensor>& registered_counters() {
  static std::vector<at::Tensor> counters;
  return counters;
}
}  // namespace detail

// Called when an op takes `counters` for its launches: check_counters_at_rest covers them from then on.
inline void register_counters(const at::Tensor& counters) {
  if (!counters.defined()) return;
  std::lock_guard lk(detail::counters_mutex());
  auto& all = detail::registered_counters();
  for (const at::Tensor& t : all) {
    if (t.is_same(counters)) return;
  }
  all.push_back(counters);
}

// The registered counters that are not zero, as "counter i of the counters at 0x...: value" lines; each is
// reset to zero once reported, so one bug is reported once. No launch runs meanwhile (the launch lock).
inline std::vector<std::string> nonzero_arrival_counters() {
  std::lock_guard launches(detail::launch_mutex());
  std::lock_guard lk(detail::counters_mutex());
  std::vector<std::string> found;
  for (const at::Tensor& t : detail::registered_counters()) {
    auto* c = static_cast<int32_t*>(t.data_ptr());
    for (int64_t i = 0; i < t.numel(); ++i) {
      if (c[i] == 0) continue;
      found.push_back("counter " + std::to_string(i) + " of the counters at " + detail::address_str(c) + ": " +
                      std::to_string(c[i]));
      c[i] = 0;
    }
  }
  return found;
}

// Throws where an op left a counter non-zero: `op` names it.
inline void check_counters_at_rest(const std::string& op) {
  const std::vector<std::string> found = nonzero_arrival_counters();
  if (found.empty()) return;
  std::string msg = "simt: arrival counters not back at zero after " + op +
                    " returned (a grid merge's last block did not reset its counter, or a block never arrived): ";
  for (size_t i = 0; i < found.size(); ++i) msg += (i ? "; " : "") + found[i];
  throw std::runtime_error(msg);
}

}  // namespace fusedbn::simt
