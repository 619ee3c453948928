// Private functions of polyprune_ext._C for the tests: the CUDA launch planning of launch_plan.h,
// compiled for the CPU, so that it is checked on machines without a GPU. Not a public API.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "launch_plan.h"

namespace polyprune {

#ifdef POLYPRUNE_WITH_CUDA
// cuda/taylor_reduce_cuda.cu: the plan the CUDA op runs for these inputs on their GPU.
ReducePlan cuda_reduce_plan(const at::Tensor& act, const at::Tensor& grad, bool per_sample);
#endif

namespace {

OperandLayout operand(const std::vector<int64_t>& strides, uint64_t address) {
  TORCH_CHECK_VALUE(strides.size() == 3, "strides must be (n_stride, c_stride, s_stride)");
  return {strides[0], strides[1], strides[2], address};
}

ReducePlan make_plan(int64_t N, int64_t C, int64_t S, int64_t element_size,
                     const std::vector<int64_t>& a_strides, uint64_t a_address,
                     const std::vector<int64_t>& g_strides, uint64_t g_address, bool per_sample,
                     int64_t sms, int64_t blocks_per_sm) {
  ReducePlan p = choose_reduce_kernel(N, C, S, element_size, operand(a_strides, a_address),
                                      operand(g_strides, g_address));
  size_reduce_grid(p, per_sample, sms, blocks_per_sm);
  return p;
}

const char* kernel_name(ReduceKernel k) {
  return k == ReduceKernel::Rows ? "rows" : k == ReduceKernel::Channels ? "channels" : "mixed";
}

const char* finish_name(ReduceFinish f) {
  return f == ReduceFinish::Direct ? "direct" : f == ReduceFinish::LastBlock ? "last_block" : "kernel";
}

pybind11::dict plan_dict(const ReducePlan& p) {
  pybind11::dict d;
  d["kernel"] = kernel_name(p.kernel);
  d["finish"] = finish_name(p.finish);
  d["vec"] = p.vec;
  d["lanes"] = p.lanes;
  d["tiles"] = p.tiles;
  d["head"] = p.head;
  d["splits"] = p.splits;
  d["chunk"] = p.chunk;
  d["tasks"] = p.tasks;
  d["groups_per_block"] = p.groups_per_block;
  d["blocks"] = p.blocks;
  d["finish_lanes"] = p.finish_lanes;
  d["finish_split_lanes"] = p.finish_split_lanes;
  return d;
}

pybind11::dict plan_taylor_reduce(int64_t N, int64_t C, int64_t S, int64_t element_size,
                                  const std::vector<int64_t>& a_strides, uint64_t a_address,
                                  const std::vector<int64_t>& g_strides, uint64_t g_address,
                                  bool per_sample, int64_t sms, int64_t blocks_per_sm) {
  return plan_dict(make_plan(N, C, S, element_size, a_strides, a_address, g_strides, g_address,
                             per_sample, sms, blocks_per_sm));
}

// How many times the kernels of this plan read each element (n, c, s) of act: every task and
// lane walked through the same index maps as on the GPU (reduce_task, row_pieces, lane_items).
// Every 16-byte vector load is also checked to start on a 16-byte boundary of act.
at::Tensor taylor_reduce_coverage(int64_t N, int64_t C, int64_t S, int64_t element_size,
                                  const std::vector<int64_t>& a_strides, uint64_t a_address,
                                  const std::vector<int64_t>& g_strides, uint64_t g_address,
                                  bool per_sample, int64_t sms, int64_t blocks_per_sm) {
  TORCH_CHECK_VALUE(N * C * S <= (int64_t(1) << 24), "coverage: at most 2^24 elements");
  const ReducePlan p = make_plan(N, C, S, element_size, a_strides, a_address, g_strides,
                                 g_address, per_sample, sms, blocks_per_sm);
  const OperandLayout a = operand(a_strides, a_address);
  at::Tensor counts = at::zeros({N, C, S}, at::kInt);
  int32_t* k = counts.data_ptr<int32_t>();
  auto visit = [&](int64_t n, int64_t c, int64_t s) {
    TORCH_CHECK(n >= 0 && n < N && c >= 0 && c < C && s >= 0 && s < S, "coverage: (", n, ", ", c,
                ", ", s, ") out of range");
    ++k[(n * C + c) * S + s];
  };
  auto vector_at = [&](int64_t n, int64_t c, int64_t s) {
    const uint64_t byte = a.address + (n * a.n_stride + c * a.c_stride + s * a.s_stride) * element_size;
    TORCH_CHECK(p.vec == 1 || byte % kVectorBytes == 0, "coverage: vector load at (", n, ", ", c,
                ", ", s, ") is not 16-byte aligned");
    for (int64_t e = 0; e < p.vec; ++e) {
      if (p.kernel == ReduceKernel::Rows) visit(n, c, s + e);
      else visit(n, c + e, s);  // channels
    }
  };
  for (int64_t task = 0; task < p.tasks; ++task) {
    const ReduceTask t = reduce_task(p, task);
    const int64_t length = t.end - t.begin;
    if (p.kernel == ReduceKernel::Rows) {
      const int64_t offset = t.n * a.n_stride + t.c * a.c_stride + t.begin * a.s_stride;
      const RowPieces r = row_pieces(p, offset, length);
      for (int64_t lane = 0; lane < p.lanes; ++lane) {
        if (lane < r.head) visit(t.n, t.c, t.begin + lane);
        for (int64_t i = 0; i < lane_items(r.vectors, lane, p.lanes); ++i)
          vector_at(t.n, t.c, t.begin + r.head + (lane + i * p.lanes) * p.vec);
        if (lane < r.tail) visit(t.n, t.c, t.begin + r.head + r.vectors * p.vec + lane);
      }
    } else if (p.kernel == ReduceKernel::Channels) {
      const int64_t slots = kWarp / p.lanes;
      for (int64_t lane = 0; lane < kWarp; ++lane) {
        const int64_t slot = lane / p.lanes, c = (t.c * p.lanes + lane % p.lanes) * p.vec;
        if (c >= C) continue;
        for (int64_t i = 0; i < lane_items(length, slot, slots); ++i)
          vector_at(t.n, c, t.begin + slot + i * slots);
      }
    } else {  // mixed: lane c multiplies channel c at every position of the task
      for (int64_t lane = 0; lane < kWarp; ++lane) {
        const int64_t c = t.c * kWarp + lane;
        if (c >= C) continue;
        for (int64_t s = t.begin; s < t.end; ++s) visit(t.n, c, s);
      }
    }
  }
  return counts;
}

pybind11::dict plan_compact(int64_t outer, int64_t K, int64_t inner,
                            const std::vector<int64_t>& keep, int64_t element_size,
                            uint64_t address, int64_t numel) {
  const CompactCopy c = plan_compact_copy(outer, K, inner, static_cast<int64_t>(keep.size()),
                                          keep.data(), element_size, address, numel);
  pybind11::dict d;
  d["first_moved"] = compact_first_moved(outer, K, inner, keep.data(), keep.size());
  d["scratch_cap_bytes"] = compact_scratch_cap_bytes(numel, element_size);
  d["word_bytes"] = c.word_bytes;
  d["inner_words"] = c.inner_words;
  d["first"] = c.first;
  d["total"] = c.total;
  d["one_block"] = c.one_block;
  d["scratch_words"] = c.scratch_words;
  d["batches"] = c.batches;
  return d;
}

}  // namespace

void bind_launch_plan(pybind11::module& m) {
  using namespace pybind11::literals;
  m.def("_plan_taylor_reduce", &plan_taylor_reduce, "CUDA launch plan of taylor_reduce (tests)",
        "N"_a, "C"_a, "S"_a, "element_size"_a, "a_strides"_a, "a_address"_a, "g_strides"_a,
        "g_address"_a, "per_sample"_a, "sms"_a, "blocks_per_sm"_a);
  m.def("_taylor_reduce_coverage", &taylor_reduce_coverage,
        "Reads of each act element under the CUDA plan (tests)", "N"_a, "C"_a, "S"_a,
        "element_size"_a, "a_strides"_a, "a_address"_a, "g_strides"_a, "g_address"_a,
        "per_sample"_a, "sms"_a, "blocks_per_sm"_a);
#ifdef POLYPRUNE_WITH_CUDA
  m.def(
      "_cuda_reduce_plan",
      [](const at::Tensor& act, const at::Tensor& grad, bool per_sample) {
        return plan_dict(cuda_reduce_plan(act, grad, per_sample));
      },
      "The plan taylor_reduce runs for these CUDA inputs on their GPU (tests)", "act"_a, "grad"_a,
      "per_sample"_a);
#endif
  m.def("_plan_compact", &plan_compact, "CUDA copy plan of compact_ (tests)", "outer"_a, "K"_a,
        "inner"_a, "keep"_a, "element_size"_a, "address"_a, "numel"_a);
}

}  // namespace polyprune
