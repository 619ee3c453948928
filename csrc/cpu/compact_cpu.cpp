// compact_ on the CPU: one forward pass of memmoves. Every destination lies at or before its source
// and both advance monotonically, so moving slices in order never overwrites a slice not yet read.
#include <torch/library.h>

#include <cstring>

#include "../compact.h"

namespace polyprune {
namespace {

void compact_cpu(at::Tensor self, const at::Tensor& keep_arg, int64_t dim) {
  const CompactPlan p = check_compact_inputs(self, keep_arg, dim);
  const at::Tensor keep = readable_keep(keep_arg, self);
  const int64_t* k = keep.const_data_ptr<int64_t>();
  const int64_t slices = p.outer * p.kept;  // kept slices, in their new memory order
  if (slices == 0 || p.inner == 0) return;
  // The slices before the first one that moves are already in place (all of them when keep is a
  // prefix): start there.
  const int64_t first = compact_first_moved(p.outer, p.K, p.inner, k, p.kept) / p.inner;
  auto* base = static_cast<char*>(self.data_ptr());
  const int64_t bytes = p.inner * self.element_size();
  for (int64_t i = first; i < slices; ++i) {
    const int64_t o = i / p.kept, j = i % p.kept;
    std::memmove(base + i * bytes, base + (o * p.K + k[j]) * bytes, bytes);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(polyprune_ext, CPU, m) { m.impl("compact_", &compact_cpu); }

}  // namespace polyprune
