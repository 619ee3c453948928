// Shared by the CPU and CUDA kernels of compact_: the input checks and the memory-order plan.
#pragma once

#include <ATen/ATen.h>

#include "launch_plan.h"
#include "memory_overlap.h"

namespace polyprune {

// A dense tensor seen in memory order as (outer, K, inner) around `dim`: the kept slices of `dim`
// are `inner` consecutive elements each, repeated `outer` times with a period of K * inner.
struct CompactPlan {
  int64_t outer, K, inner, kept;
};

inline CompactPlan check_compact_inputs(const at::Tensor& self, const at::Tensor& keep,
                                        int64_t dim) {
  TORCH_CHECK_VALUE(self.dim() >= 1, "compact_: tensor must have at least one dim");
  TORCH_CHECK_VALUE(dim >= 0 && dim < self.dim(), "compact_: dim ", dim, " out of range for a ",
              self.dim(), "-d tensor");
  TORCH_CHECK_VALUE(self.is_non_overlapping_and_dense(),
              "compact_: tensor must be dense (contiguous, channels_last or another permutation "
              "of a contiguous layout); got sizes ", self.sizes(), " strides ", self.strides());
  TORCH_CHECK_VALUE(keep.device().is_cpu() && keep.scalar_type() == at::kLong && keep.dim() == 1 &&
                  keep.is_contiguous(),
              "compact_: keep must be a contiguous 1-d int64 CPU tensor");
  const int64_t K = self.size(dim), kept = keep.numel();
  TORCH_CHECK_VALUE(kept > 0, "compact_: keep is empty; at least one slice must stay");
  const int64_t* k = keep.data_ptr<int64_t>();
  for (int64_t j = 0; j < kept; ++j) {
    TORCH_CHECK_INDEX(k[j] >= 0 && k[j] < K, "compact_: keep[", j, "] = ", k[j],
                " out of range for size ", K, " of dim ", dim);
    TORCH_CHECK_VALUE(j == 0 || k[j] > k[j - 1], "compact_: keep must be sorted and unique; keep[", j,
                "] = ", k[j], " follows ", k[j - 1]);
  }
  const int64_t inner = K == 1 ? 1 : self.stride(dim);
  const int64_t outer = self.numel() == 0 ? 0 : self.numel() / (K * inner);
  return {outer, K, inner, kept};
}

// keep as the kernels read it: a keep that shares memory with the tensor (an int64 view of it)
// would be overwritten by the moves it directs, so it is copied first.
inline at::Tensor readable_keep(const at::Tensor& keep, const at::Tensor& self) {
  return may_share_memory(keep, self) ? keep.clone() : keep;
}

}  // namespace polyprune
