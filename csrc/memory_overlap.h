// Whether an op's written tensor shares memory with one of its inputs. Used by the input checks
// of both ops, so the CPU and CUDA kernels follow the same rule.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace polyprune {

// The bytes from a tensor's first element to the end of its last (strides are never negative
// in torch, so the first element is at data_ptr).
inline std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  int64_t last = 0;  // offset of the last element, in elements
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// True when a and b may share memory: their byte ranges intersect. Exact for dense tensors;
// for strided views it also counts the gaps between their elements (a false positive there
// costs a copy of a small input, or a clear error, never a wrong result).
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  const auto ra = byte_range(a), rb = byte_range(b);
  return ra.first < rb.second && rb.first < ra.second;
}

}  // namespace polyprune
