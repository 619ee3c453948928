// compact_ on the CPU: one forward pass of memmoves. Every destination lies at or before its source
// and both advance monotonically, so moving slices in order never overwrites a slice not yet read.
#include <torch/library.h>

#include <cstring>

#include "../compact.h"

namespace polyprune {
namespace {

void compact_cpu(at::Tensor self, const at::Tensor& keep, int64_t dim) {
  const CompactPlan p = check_compact_inputs(self, keep, dim);
  auto* base = static_cast<char*>(self.data_ptr());
  const int64_t* k = keep.data_ptr<int64_t>();
  const int64_t bytes = p.inner * self.element_size();
  for (int64_t o = 0; o < p.outer; ++o) {
    for (int64_t j = 0; j < p.kept; ++j) {
      char* dst = base + (o * p.kept + j) * bytes;
      const char* src = base + (o * p.K + k[j]) * bytes;
      if (dst != src) std::memmove(dst, src, bytes);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(polyprune_ext, CPU, m) { m.impl("compact_", &compact_cpu); }

}  // namespace polyprune
