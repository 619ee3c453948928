// Shared by the CPU and CUDA kernels of taylor_reduce_accumulate_: the mode, the input checks
// (memory overlap included), the (N, C, S) view of an activation whose spatial dims are flattened
// into one, and the scale as the kernels read it.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "launch_plan.h"
#include "memory_overlap.h"

namespace polyprune {

enum class ReduceMode { PerSample, Sum, SumAbs, SumSq };

inline ReduceMode parse_mode(const std::string& mode) {
  if (mode == "per_sample") return ReduceMode::PerSample;
  if (mode == "sum") return ReduceMode::Sum;
  if (mode == "sum_abs") return ReduceMode::SumAbs;
  if (mode == "sum_sq") return ReduceMode::SumSq;
  TORCH_CHECK_VALUE(false, "taylor_reduce: reduce must be one of per_sample, sum, sum_abs, sum_sq; got '",
              mode, "'");
}

// Strides of one tensor seen as (N, C, S). Spatial dims collapse into S when they are laid out as
// one run (true for contiguous NCHW and for channels_last); otherwise `collapsible` is false.
struct NCSView {
  int64_t n_stride = 0, c_stride = 0, s_stride = 1;
  bool collapsible = true;
};

inline NCSView ncs_view(const at::Tensor& t) {
  NCSView v;
  v.n_stride = t.stride(0);
  v.c_stride = t.stride(1);
  bool first = true;
  int64_t expected = 0;  // stride the next (outer) spatial dim must have to continue the run
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;  // size-1 dims have no meaningful stride
    if (first) {
      v.s_stride = t.stride(d);
      first = false;
    } else if (t.stride(d) != expected) {
      v.collapsible = false;
    }
    expected = t.stride(d) * t.size(d);
  }
  return v;
}

inline int64_t spatial_numel(const at::Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return s;
}

// The same rules the Python wrapper enforces with friendlier messages; repeated here so a direct
// torch.ops call can never read out of bounds.
inline void check_reduce_inputs(const at::Tensor& out, const at::Tensor& act, const at::Tensor& grad,
                                const c10::optional<at::Tensor>& scale, ReduceMode mode) {
  TORCH_CHECK_VALUE(act.dim() >= 2 && act.dim() <= 5,
              "taylor_reduce: act must be (N, C, *spatial) with 0 to 3 spatial dims, got shape ",
              act.sizes());
  TORCH_CHECK_VALUE(grad.sizes() == act.sizes(), "taylor_reduce: grad shape ", grad.sizes(),
              " differs from act shape ", act.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == act.scalar_type(), "taylor_reduce: grad dtype ",
              grad.scalar_type(), " differs from act dtype ", act.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == act.device(), "taylor_reduce: grad is on ", grad.device(),
              ", act on ", act.device());
  const auto st = act.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "taylor_reduce: act dtype must be float32, float64, float16 or bfloat16, got ", st);
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(out.scalar_type() == acc, "taylor_reduce: out must be ", acc, " for ", st,
              " inputs, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == act.device(), "taylor_reduce: out is on ", out.device(),
              ", act on ", act.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), "taylor_reduce: out must be contiguous");
  // out is written while act and grad are read, by other threads on CUDA: refuse rather than
  // copy a tensor of act's size (there is no use for such a call). A scale that overlaps out is
  // copied instead (kernel_scale).
  TORCH_CHECK_VALUE(!may_share_memory(out, act), "taylor_reduce: out shares memory with act");
  TORCH_CHECK_VALUE(!may_share_memory(out, grad), "taylor_reduce: out shares memory with grad");
  const int64_t N = act.size(0), C = act.size(1);
  if (mode == ReduceMode::PerSample) {
    TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == N && out.size(1) == C,
                "taylor_reduce: out must have shape (N, C) = (", N, ", ", C,
                ") for reduce per_sample, got ", out.sizes());
  } else {
    TORCH_CHECK_VALUE(out.dim() == 1 && out.size(0) == C, "taylor_reduce: out must have shape (C,) = (",
                C, ",), got ", out.sizes());
  }
  if (scale.has_value()) {
    TORCH_CHECK_VALUE(scale->dim() == 1 && scale->size(0) == N,
                "taylor_reduce: scale must have shape (N,) = (", N, ",), got ", scale->sizes());
    TORCH_CHECK_VALUE(scale->device() == act.device(), "taylor_reduce: scale is on ", scale->device(),
                ", act on ", act.device());
    TORCH_CHECK_TYPE(at::isFloatingType(scale->scalar_type()),
                "taylor_reduce: scale must be floating point, got ", scale->scalar_type());
  }
}

// The per-sample scale as the kernels read it (see ScaleArg): undefined when absent, float32 or
// float64 as given (any stride), other dtypes converted to out's. A scale that shares memory
// with out is copied first, so it is read as it was before the call on every device.
inline at::Tensor kernel_scale(const c10::optional<at::Tensor>& scale, const at::Tensor& out) {
  if (!scale.has_value()) return {};
  const auto st = scale->scalar_type();
  if (st != at::kFloat && st != at::kDouble) return scale->to(out.scalar_type());
  return may_share_memory(*scale, out) ? scale->clone() : *scale;
}

inline ScaleArg scale_arg(const at::Tensor& scale) {
  ScaleArg s;
  if (!scale.defined()) return s;
  s.data = scale.const_data_ptr();
  s.stride = scale.stride(0);
  s.is_double = scale.scalar_type() == at::kDouble;
  return s;
}

}  // namespace polyprune
