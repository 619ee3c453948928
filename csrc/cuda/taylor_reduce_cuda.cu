// taylor_reduce_accumulate_ on CUDA: one kernel reads act and grad once; when an output sums the
// work of several tasks, its last block (or, for many partial sums, a second kernel) finishes.
//
// The work is a list of tasks, walked by one wave of resident blocks with a grid-stride loop, so
// any size runs on a grid that fits the GPU. launch_plan.h chooses the kernel and sizes the grid:
//   - rows kernel (NCHW: positions contiguous): a group of 8, 16 or 32 lanes per
//     (n, c, spatial split) with 16-byte loads after a scalar head; one lane per row for rows
//     shorter than 8 (1x1 maps, (N, C) inputs); scalar loads for other strides;
//   - channels kernel (channels_last): a warp per (n, channel tile, split), each lane loading 16
//     bytes of channels at one position, as many positions per warp load as the channel count
//     leaves room for (C = 16 in float16: 2 lanes per position, 16 positions);
//   - mixed kernel (one operand of each layout): a warp per (n, 32 channels, split), the NCHW
//     operand transposed through shared memory so that both are read coalesced.
// Every sum is taken in a fixed order: each lane's loads in order, then a fixed shuffle tree;
// partial sums of a split or of the batch in index order. The last block is elected with an
// integer atomic counter. No float atomics: the same input gives the same bits on the same GPU
// model.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "../launch_plan.h"
#include "../taylor_reduce.h"
#include "device_info.cuh"

namespace polyprune {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kUnroll = 4;  // loads of each operand in flight per lane
// Rows and channels kernels: registers for 3 resident blocks (up to 80 per thread). With no
// bound ptxas aims at 64 and spills a few bytes on some archs; 768 threads per SM still keep
// 24 KB (scalar float32) to 96 KB (16-byte loads) of loads in flight, above the ~20 KB an H200
// SM needs.
constexpr int kStageOneBlocksPerSM = 3;

// V elements of T, read with one load of sizeof(T) * V bytes.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// A read-only (ld.global.nc) load of V elements; 16 bytes when V is the plan's vector width.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  constexpr int bytes = sizeof(T) * V;
  Pack<T, V> r;
  if constexpr (bytes == 16) {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&r, &w, bytes);
  } else if constexpr (bytes == 8) {
    const uint2 w = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(&r, &w, bytes);
  } else if constexpr (bytes == 4) {
    const unsigned w = __ldg(reinterpret_cast<const unsigned*>(p));
    memcpy(&r, &w, bytes);
  } else {
    static_assert(bytes == 2, "elements of 2, 4 or 8 bytes");
    const unsigned short w = __ldg(reinterpret_cast<const unsigned short*>(p));
    memcpy(&r, &w, bytes);
  }
  return r;
}

template <typename Acc, typename T>
__device__ __forceinline__ Acc load_one(const T* p) {
  return static_cast<Acc>(load<T, 1>(p).v[0]);
}

// acc[i] += a[k * a_step + i] * g[k * g_step + i] for k < count, i < V: one lane's share of a
// task, kUnroll loads of each operand issued before any is used.
template <typename T, typename Acc, int V>
__device__ __forceinline__ void dot_packs(const T* a, int64_t a_step, const T* g, int64_t g_step,
                                          int64_t count, Acc (&acc)[V]) {
  for (; count >= kUnroll; count -= kUnroll) {
    Pack<T, V> x[kUnroll], y[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      x[u] = load<T, V>(a);
      y[u] = load<T, V>(g);
      a += a_step;
      g += g_step;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += static_cast<Acc>(x[u].v[i]) * static_cast<Acc>(y[u].v[i]);
  }
  for (; count > 0; --count) {
    const Pack<T, V> x = load<T, V>(a), y = load<T, V>(g);
    a += a_step;
    g += g_step;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += static_cast<Acc>(x.v[i]) * static_cast<Acc>(y.v[i]);
  }
}

// Where results go (see ReduceFinish).
template <typename Acc>
struct Output {
  Acc* out;
  Acc* partial;       // partial[(n * splits + split) * C + c], unless the finish is Direct
  unsigned* counter;  // blocks done, zero at launch (finish LastBlock)
  ScaleArg scale;
  ReduceMode mode;
};

template <typename Acc>
__device__ __forceinline__ Acc batch_term(ReduceMode mode, Acc v) {
  return mode == ReduceMode::Sum ? v : mode == ReduceMode::SumAbs ? abs(v) : v * v;
}

// Where task (n, split) puts its sum for channel c: (n * splits + split) * C + c indexes the
// partial sums, and when a task's sum is a whole output (no splits) also out: (n, c) for
// per_sample, c for a reducing mode (then N = 1, n = 0).
POLYPRUNE_HD int64_t result_index(const ReducePlan& p, int64_t n, int64_t split, int64_t c) {
  return (n * p.splits + split) * p.C + c;
}

// A task's sum z for result `index` of sample n: kept as a partial sum, or added into out.
template <typename Acc>
__device__ __forceinline__ void put(const ReducePlan& p, const Output<Acc>& o, int64_t index,
                                    int64_t n, Acc z) {
  if (p.finish != ReduceFinish::Direct)
    o.partial[index] = z;
  else if (o.mode == ReduceMode::PerSample)
    o.out[index] += scaled(o.scale, n, z);
  else
    o.out[index] += batch_term(o.mode, scaled(o.scale, n, z));
}

// The sum of v over each segment of `lanes` consecutive threads (a power of two up to
// kFinishMaxLanes) in a fixed tree, in the segment's first thread. Every thread of the block
// must call it: it synchronizes the block when segments span warps.
template <typename Acc>
__device__ Acc segment_sum(Acc v, int lanes) {
  const int width = lanes < kWarp ? lanes : kWarp;
  for (int offset = width / 2; offset > 0; offset /= 2)
    v += __shfl_down_sync(kFullMask, v, offset, width);
  if (lanes <= kWarp) return v;
  __shared__ Acc warp_sums[kBlockThreads / kWarp];
  const int warp = threadIdx.x / kWarp;
  __syncthreads();  // the previous round's reads of warp_sums are done
  if (threadIdx.x % kWarp == 0) warp_sums[warp] = v;
  __syncthreads();
  if (threadIdx.x % lanes == 0)
    for (int w = 1; w < lanes / kWarp; ++w) v += warp_sums[warp + w];
  return v;
}

// Outputs [first, last) from the partial sums, by the whole block: (n, c) flat for per_sample,
// channels otherwise. finish_lanes threads per output; of those, finish_split_lanes share each
// sample's splits (k = j, j + finish_split_lanes, ...) and the others its samples
// (n = j, j + ..., reducing modes). Fixed order: each thread's loads in order, then fixed
// trees. __ldcg: partial sums written by other blocks are read from L2, never a stale L1.
template <typename Acc>
__device__ void finish_outputs(const ReducePlan& p, const Output<Acc>& o, int64_t first,
                               int64_t last) {
  const int lanes = p.finish_lanes, split_lanes = p.finish_split_lanes;
  const int r = threadIdx.x % lanes, jn = r / split_lanes, jk = r % split_lanes;
  // Sample n's sum for channel c (n < 0: none) in the thread with jk == 0; every thread of the
  // warp calls it (a shuffle tree over the split lanes).
  auto z = [&](int64_t n, int64_t c) {
    Acc v = 0;
    if (n >= 0) {
      const Acc* q = o.partial + n * p.splits * p.C + c;
      for (int64_t k = jk; k < p.splits; k += split_lanes) v += __ldcg(q + k * p.C);
    }
    for (int offset = split_lanes / 2; offset > 0; offset /= 2)
      v += __shfl_down_sync(kFullMask, v, offset, split_lanes);
    return v;
  };
  // Every thread makes the same rounds: the shuffles and syncs need all of them.
  for (int64_t o0 = first; o0 < last; o0 += blockDim.x / lanes) {
    const int64_t i = o0 + threadIdx.x / lanes;  // this thread's output
    const bool valid = i < last;
    if (o.mode == ReduceMode::PerSample) {  // lanes == split_lanes
      const int64_t n = valid ? quot(i, p.C) : -1;
      const Acc v = z(n, valid ? i - n * p.C : 0);
      if (valid && jk == 0) o.out[i] += scaled(o.scale, n, v);
      continue;
    }
    Acc t = 0;
    for (int64_t n0 = 0; n0 < p.N; n0 += lanes / split_lanes) {
      const int64_t n = n0 + jn;
      const bool mine = valid && n < p.N;
      const Acc v = z(mine ? n : -1, valid ? i : 0);
      if (mine && jk == 0) t += batch_term(o.mode, scaled(o.scale, n, v));
    }
    t = segment_sum(t, lanes);
    if (valid && r == 0) o.out[i] += t;
  }
}

// The end of every stage-1 kernel: with a LastBlock finish, the last block to get here finishes.
template <typename Acc>
__device__ void finish_if_last(const ReducePlan& p, const Output<Acc>& o) {
  if (p.finish != ReduceFinish::LastBlock) return;
  __shared__ bool last;
  __threadfence();  // this block's partial sums are visible to all before the block is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(o.counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // read the others' partial sums only after seeing every block counted
  finish_outputs(p, o, 0, o.mode == ReduceMode::PerSample ? p.N * p.C : p.C);
}

template <typename T, typename Acc, int V>
__global__ void __launch_bounds__(kBlockThreads, kStageOneBlocksPerSM)
    rows_kernel(const T* __restrict__ a, NCSView va, const T* __restrict__ g, NCSView vg,
                ReducePlan p, Output<Acc> o) {
  const int lanes = p.lanes, lane = threadIdx.x % lanes;
  // The groups of a warp go through the tasks together (the shuffles need the whole warp): the
  // warp's first group steps through them, each group at its own offset.
  const int64_t group = blockIdx.x * p.groups_per_block + threadIdx.x / lanes;
  const int64_t warp_first = group - (threadIdx.x % kWarp) / lanes;
  for (int64_t first = warp_first; first < p.tasks; first += gridDim.x * p.groups_per_block) {
    const int64_t task = first + (group - warp_first);
    const bool valid = task < p.tasks;
    ReduceTask t{};
    Acc z = 0;
    if (valid) {
      t = reduce_task(p, task);
      const int64_t ao = t.n * va.n_stride + t.c * va.c_stride + t.begin * va.s_stride;
      const int64_t go = t.n * vg.n_stride + t.c * vg.c_stride + t.begin * vg.s_stride;
      const RowPieces r = row_pieces(p, ao, t.end - t.begin);
      Acc acc[V] = {};
      if constexpr (V > 1) {  // positions contiguous: head, vectors, tail
        if (lane < r.head) acc[0] += load_one<Acc>(a + ao + lane) * load_one<Acc>(g + go + lane);
        dot_packs<T, Acc, V>(a + ao + r.head + lane * V, lanes * V, g + go + r.head + lane * V,
                             lanes * V, lane_items(r.vectors, lane, lanes), acc);
        const int64_t tail = r.head + r.vectors * V + lane;
        if (lane < r.tail) acc[0] += load_one<Acc>(a + ao + tail) * load_one<Acc>(g + go + tail);
#pragma unroll
        for (int w = V / 2; w > 0; w /= 2)
#pragma unroll
          for (int i = 0; i < w; ++i) acc[i] += acc[i + w];
      } else {  // any strides
        dot_packs<T, Acc, 1>(a + ao + lane * va.s_stride, lanes * va.s_stride,
                             g + go + lane * vg.s_stride, lanes * vg.s_stride,
                             lane_items(r.vectors, lane, lanes), acc);
      }
      z = acc[0];
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2)
      z += __shfl_down_sync(kFullMask, z, offset, lanes);
    if (valid && lane == 0) put(p, o, result_index(p, t.n, t.split, t.c), t.n, z);
  }
  finish_if_last(p, o);
}

template <typename T, typename Acc, int V>
__global__ void __launch_bounds__(kBlockThreads, kStageOneBlocksPerSM)
    channels_kernel(const T* __restrict__ a, NCSView va, const T* __restrict__ g, NCSView vg,
                    ReducePlan p, Output<Acc> o) {
  const int lane = threadIdx.x % kWarp;
  // p.lanes lanes cover the tile's channels at one position; the warp's `slots` lane sets read
  // `slots` consecutive positions at once.
  const int slots = kWarp / p.lanes, slot = lane / p.lanes;
  const int64_t warp = blockIdx.x * p.groups_per_block + threadIdx.x / kWarp;
  for (int64_t task = warp; task < p.tasks; task += gridDim.x * p.groups_per_block) {
    const ReduceTask t = reduce_task(p, task);
    const int64_t c = (t.c * p.lanes + lane % p.lanes) * V;  // this lane's first channel
    const int64_t s = t.begin + slot;
    Acc acc[V] = {};
    if (c < p.C)
      dot_packs<T, Acc, V>(a + t.n * va.n_stride + c * va.c_stride + s * va.s_stride,
                           slots * va.s_stride,
                           g + t.n * vg.n_stride + c * vg.c_stride + s * vg.s_stride,
                           slots * vg.s_stride, lane_items(t.end - t.begin, slot, slots), acc);
    // Add up the slots holding the same channels (lanes l, l + p.lanes, ...) in a fixed tree.
    for (int offset = kWarp / 2; offset >= p.lanes; offset /= 2)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += __shfl_down_sync(kFullMask, acc[i], offset);
    if (slot == 0 && c < p.C)
#pragma unroll
      for (int i = 0; i < V; ++i) put(p, o, result_index(p, t.n, t.split, c + i), t.n, acc[i]);
  }
  finish_if_last(p, o);
}

// r: the operand with positions contiguous (NCHW), k: the one with channels contiguous.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kMixedWarps * kWarp)
    mixed_kernel(const T* __restrict__ r, NCSView vr, const T* __restrict__ k, NCSView vk,
                 ReducePlan p, Output<Acc> o) {
  __shared__ Acc tiles[kMixedWarps][kWarp][kWarp + 1];  // + 1: column reads free of bank conflicts
  Acc(*tile)[kWarp + 1] = tiles[threadIdx.x / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = blockIdx.x * p.groups_per_block + threadIdx.x / kWarp;
  for (int64_t task = warp; task < p.tasks; task += gridDim.x * p.groups_per_block) {
    const ReduceTask t = reduce_task(p, task);
    const int64_t c0 = t.c * kWarp, c = c0 + lane;  // the tile's first channel, this lane's
    const T* rp = r + t.n * vr.n_stride + c0 * vr.c_stride;
    const T* kp = k + t.n * vk.n_stride + c * vk.c_stride;
    Acc acc = 0;
    for (int64_t s0 = t.begin; s0 < t.end; s0 += kWarp) {
      const int count = static_cast<int>(min(static_cast<int64_t>(kWarp), t.end - s0));
      // tile[j][q] = r[c0 + j, s0 + q]: for each channel, lane q reads position s0 + q.
#pragma unroll 8
      for (int j = 0; j < kWarp; ++j)
        tile[j][lane] = lane < count && c0 + j < p.C
                            ? load_one<Acc>(rp + j * vr.c_stride + (s0 + lane) * vr.s_stride)
                            : Acc(0);
      __syncwarp();
      // Lane c reads channel c of k at each position (coalesced) and takes r's from the tile.
      if (c < p.C)
#pragma unroll 8
        for (int q = 0; q < count; ++q) acc += load_one<Acc>(kp + (s0 + q) * vk.s_stride) * tile[lane][q];
      __syncwarp();
    }
    if (c < p.C) put(p, o, result_index(p, t.n, t.split, c), t.n, acc);
  }
  finish_if_last(p, o);
}

template <typename Acc>
__global__ void __launch_bounds__(kBlockThreads) finish_kernel(ReducePlan p, Output<Acc> o) {
  const bool per_sample = o.mode == ReduceMode::PerSample;
  const int64_t outputs = per_sample ? p.N * p.C : p.C;
  const int64_t per_block = blockDim.x / p.finish_lanes;
  for (int64_t first = blockIdx.x * per_block; first < outputs; first += gridDim.x * per_block)
    finish_outputs(p, o, first, min(outputs, first + per_block));
}

OperandLayout layout_of(const at::Tensor& t, const NCSView& v) {
  return {v.n_stride, v.c_stride, v.s_stride, reinterpret_cast<uint64_t>(t.const_data_ptr())};
}

// What a call runs: the plan, sized for this GPU, and the stage-1 kernel it names.
template <typename T>
struct Launch {
  using Acc = at::opmath_type<T>;
  ReducePlan plan;
  void (*kernel)(const T*, NCSView, const T*, NCSView, ReducePlan, Output<Acc>);
  int threads;
  bool swap;  // mixed kernel with grad as the NCHW operand: grad goes first
};

template <typename T>
Launch<T> plan_launch(const at::Tensor& a, const at::Tensor& g, bool per_sample) {
  using Acc = at::opmath_type<T>;
  constexpr int kVec = kVectorBytes / sizeof(T);
  const NCSView va = ncs_view(a), vg = ncs_view(g);
  const OperandLayout la = layout_of(a, va);
  const int64_t S = spatial_numel(a);
  Launch<T> l{choose_reduce_kernel(a.size(0), a.size(1), S, sizeof(T), la, layout_of(g, vg)),
              nullptr, kBlockThreads, false};
  switch (l.plan.kernel) {
    case ReduceKernel::Rows:
      l.kernel = l.plan.vec > 1 ? rows_kernel<T, Acc, kVec> : rows_kernel<T, Acc, 1>;
      break;
    case ReduceKernel::Channels:
      l.kernel = l.plan.vec > 1 ? channels_kernel<T, Acc, kVec> : channels_kernel<T, Acc, 1>;
      break;
    case ReduceKernel::Mixed:
      l.kernel = mixed_kernel<T, Acc>;
      l.threads = kMixedWarps * kWarp;
      l.swap = !spatial_inner(la, S);
      break;
  }
  const int device = a.get_device();
  size_reduce_grid(l.plan, per_sample, multiprocessor_count(device),
                   blocks_per_multiprocessor(reinterpret_cast<const void*>(l.kernel), device,
                                             l.threads));
  return l;
}

// Stage 1 and, if planned, the finish kernel, on the current stream, with the partial sums in a
// buffer from the caching allocator when the plan needs them.
template <typename T>
void reduce(const at::Tensor& a, const at::Tensor& g, const at::Tensor& out,
            const at::Tensor& scale, ReduceMode mode) {
  using Acc = at::opmath_type<T>;
  const bool per_sample = mode == ReduceMode::PerSample;
  const Launch<T> l = plan_launch<T>(a, g, per_sample);
  const ReducePlan& p = l.plan;
  Output<Acc> o{out.data_ptr<Acc>(), nullptr, nullptr, scale_arg(scale), mode};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor work;  // the block counter (padded to 16 bytes), then the partial sums
  if (p.finish != ReduceFinish::Direct) {
    work = at::empty({16 + p.N * p.C * p.splits * static_cast<int64_t>(sizeof(Acc))},
                     a.options().dtype(at::kByte));
    o.counter = static_cast<unsigned*>(work.data_ptr());
    o.partial = reinterpret_cast<Acc*>(static_cast<char*>(work.data_ptr()) + 16);
    if (p.finish == ReduceFinish::LastBlock)
      C10_CUDA_CHECK(cudaMemsetAsync(o.counter, 0, sizeof(unsigned), stream));
  }
  const NCSView va = ncs_view(a), vg = ncs_view(g);
  const T* x = a.const_data_ptr<T>();
  const T* y = g.const_data_ptr<T>();
  if (l.swap)
    l.kernel<<<p.blocks, l.threads, 0, stream>>>(y, vg, x, va, p, o);
  else
    l.kernel<<<p.blocks, l.threads, 0, stream>>>(x, va, y, vg, p, o);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.finish == ReduceFinish::Kernel) {
    const int device = a.get_device();
    const int64_t outputs = per_sample ? p.N * p.C : p.C;
    const int64_t per_block = kBlockThreads / p.finish_lanes;
    const int64_t capacity = static_cast<int64_t>(multiprocessor_count(device)) *
                             blocks_per_multiprocessor(
                                 reinterpret_cast<const void*>(finish_kernel<Acc>), device,
                                 kBlockThreads);
    const int64_t blocks = std::clamp<int64_t>(ceil_div(outputs, per_block), 1, capacity);
    finish_kernel<Acc><<<blocks, kBlockThreads, 0, stream>>>(p, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // `work` goes back to the caching allocator here, reusable by later work on this stream only.
}

// Layouts whose spatial dims do not form one run (rare: slices, odd permutations) are copied.
std::pair<at::Tensor, at::Tensor> flat_inputs(const at::Tensor& act, const at::Tensor& grad) {
  const bool flat = ncs_view(act).collapsible && ncs_view(grad).collapsible;
  return {flat ? act : act.contiguous(), flat ? grad : grad.contiguous()};
}

void taylor_reduce_accumulate_cuda(at::Tensor out, const at::Tensor& act, const at::Tensor& grad,
                                   const c10::optional<at::Tensor>& scale,
                                   c10::string_view mode_name) {
  const ReduceMode mode = parse_mode(std::string(mode_name));
  check_reduce_inputs(out, act, grad, scale, mode);
  const c10::cuda::CUDAGuard guard(act.device());
  const auto [a, g] = flat_inputs(act, grad);
  if (a.size(0) == 0 || a.size(1) == 0) return;
  const at::Tensor s = kernel_scale(scale, out);  // undefined: no scale, nothing to read
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "taylor_reduce_cuda",
                                  [&] { reduce<scalar_t>(a, g, out, s, mode); });
}

}  // namespace

// The plan a call with these inputs runs on their GPU (polyprune_ext._C._cuda_reduce_plan, for
// the GPU tests: which kernel, vector width, splits and finish a shape gets).
ReducePlan cuda_reduce_plan(const at::Tensor& act, const at::Tensor& grad, bool per_sample) {
  TORCH_CHECK_VALUE(act.is_cuda() && grad.device() == act.device() && act.sizes() == grad.sizes() &&
                        act.scalar_type() == grad.scalar_type() && act.dim() >= 2,
                    "_cuda_reduce_plan: act and grad must be CUDA tensors of one shape and dtype");
  const c10::cuda::CUDAGuard guard(act.device());
  const auto [a, g] = flat_inputs(act, grad);
  ReducePlan p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cuda_reduce_plan",
                                  [&] { p = plan_launch<scalar_t>(a, g, per_sample).plan; });
  return p;
}

TORCH_LIBRARY_IMPL(polyprune_ext, CUDA, m) {
  m.impl("taylor_reduce_accumulate_", &taylor_reduce_accumulate_cuda);
}

}  // namespace polyprune
