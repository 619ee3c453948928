// taylor_reduce_accumulate_ on CUDA.
//
// Stage 1 reads act and grad once and writes partial[n, c, split] = sum over one slice of the
// spatial positions of act * grad, each by one block with a fixed-order tree reduction:
//   - rows kernel: one block per (n, c, split), threads striding over contiguous spatial positions
//     (NCHW; also any other strides, correctly but uncoalesced);
//   - channels kernel: a 32-channel x 8-position tile per block (channels_last), a warp reading 32
//     consecutive channels of one position.
// Stage 2 (one thread per channel, or per (n, c)) adds the splits and then the samples in order,
// applies the scale and the batch reduction, and adds into `out`. No atomics anywhere: the same
// input gives the same bits on the same GPU. Splitting the spatial axis keeps the GPU full when
// N * C is small (N = 1 at inference-size scoring, the first convs with C = 64).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../taylor_reduce.h"

namespace polyprune {
namespace {

constexpr int kRowThreads = 256;
constexpr int kTileC = 32, kTileS = 8;  // channels kernel block: 32 channels x 8 positions
constexpr int kUnroll = 4;              // independent loads in flight per thread

template <typename Acc>
__device__ Acc warp_sum(Acc v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// sum of a[s * sa] * g[s * sg] over s = first, first + step, ... < end: one thread's share of a
// (sample, channel) run, with kUnroll independent loads in flight.
template <typename T, typename Acc>
__device__ Acc strided_dot(const T* __restrict__ a, int64_t sa, const T* __restrict__ g,
                           int64_t sg, int64_t first, int64_t end, int64_t step) {
  Acc acc[kUnroll] = {};
  int64_t s = first;
  for (; s + (kUnroll - 1) * step < end; s += kUnroll * step) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = s + u * step;
      acc[u] += static_cast<Acc>(a[i * sa]) * static_cast<Acc>(g[i * sg]);
    }
  }
  for (; s < end; s += step) acc[0] += static_cast<Acc>(a[s * sa]) * static_cast<Acc>(g[s * sg]);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

template <typename T, typename Acc>
__global__ void rows_kernel(const T* __restrict__ a, NCSView va, const T* __restrict__ g,
                            NCSView vg, int64_t C, int64_t S, int64_t chunk, int splits,
                            Acc* __restrict__ partial) {
  const int64_t task = blockIdx.x;  // (n * C + c) * splits + split
  const int64_t row = task / splits, split = task % splits;
  const int64_t n = row / C, c = row % C;
  const int64_t begin = split * chunk, end = min(S, begin + chunk);
  Acc v = warp_sum(strided_dot<T, Acc>(a + n * va.n_stride + c * va.c_stride, va.s_stride,
                                       g + n * vg.n_stride + c * vg.c_stride, vg.s_stride,
                                       begin + threadIdx.x, end, kRowThreads));
  __shared__ Acc warp_totals[kRowThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_sum(lane < kRowThreads / 32 ? warp_totals[lane] : Acc(0));
    if (lane == 0) partial[task] = v;
  }
}

template <typename T, typename Acc>
__global__ void channels_kernel(const T* __restrict__ a, NCSView va, const T* __restrict__ g,
                                NCSView vg, int64_t C, int64_t S, int64_t chunk, int splits,
                                Acc* __restrict__ partial) {
  const int64_t c_blocks = (C + kTileC - 1) / kTileC;
  const int64_t n = blockIdx.x / c_blocks;
  const int64_t c = (blockIdx.x % c_blocks) * kTileC + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t begin = split * chunk, end = min(S, begin + chunk);
  __shared__ Acc tile[kTileS][kTileC];
  tile[threadIdx.y][threadIdx.x] =
      c < C ? strided_dot<T, Acc>(a + n * va.n_stride + c * va.c_stride, va.s_stride,
                                  g + n * vg.n_stride + c * vg.c_stride, vg.s_stride,
                                  begin + threadIdx.y, end, kTileS)
            : Acc(0);
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    Acc v = tile[0][threadIdx.x];
    for (int y = 1; y < kTileS; ++y) v += tile[y][threadIdx.x];
    partial[(n * C + c) * splits + split] = v;
  }
}

template <typename Acc>
__global__ void reduce_batch_kernel(const Acc* __restrict__ partial, int splits,
                                    const Acc* __restrict__ scale, ReduceMode mode, int64_t N,
                                    int64_t C, Acc* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  auto z = [&](int64_t n, int64_t c) {
    Acc v = 0;
    for (int k = 0; k < splits; ++k) v += partial[(n * C + c) * splits + k];
    return scale[n] * v;
  };
  if (mode == ReduceMode::PerSample) {
    if (i < N * C) out[i] += z(i / C, i % C);
    return;
  }
  if (i >= C) return;
  Acc t = 0;
  for (int64_t n = 0; n < N; ++n) {
    const Acc v = z(n, i);
    t += mode == ReduceMode::Sum ? v : mode == ReduceMode::SumAbs ? abs(v) : v * v;
  }
  out[i] += t;
}

int multiprocessor_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Splits of the spatial axis so that about 4 blocks per SM are in flight, but no split shorter
// than `min_chunk` positions.
int choose_splits(int64_t blocks, int64_t S, int64_t min_chunk, int sms) {
  const int64_t want = (4 * sms + blocks - 1) / std::max<int64_t>(blocks, 1);
  const int64_t most = std::max<int64_t>(1, S / min_chunk);
  return static_cast<int>(std::clamp<int64_t>(want, 1, std::min<int64_t>(most, 1024)));
}

void taylor_reduce_accumulate_cuda(at::Tensor out, const at::Tensor& act, const at::Tensor& grad,
                                   const c10::optional<at::Tensor>& scale,
                                   c10::string_view mode_name) {
  const ReduceMode mode = parse_mode(std::string(mode_name));
  check_reduce_inputs(out, act, grad, scale, mode);
  const c10::cuda::CUDAGuard guard(act.device());
  const bool flat = ncs_view(act).collapsible && ncs_view(grad).collapsible;
  const at::Tensor a = flat ? act : act.contiguous();
  const at::Tensor g = flat ? grad : grad.contiguous();
  const int64_t N = a.size(0), C = a.size(1), S = spatial_numel(a);
  if (N == 0 || C == 0) return;
  const NCSView va = ncs_view(a), vg = ncs_view(g);
  const at::ScalarType acc = out.scalar_type();
  const at::Tensor s = scale_or_ones(scale, a, acc);
  const bool channels_inner = va.c_stride == 1 && vg.c_stride == 1 && C > 1 &&
                              !(va.s_stride == 1 && vg.s_stride == 1 && S > 1);
  const int sms = multiprocessor_count(a.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "taylor_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    int splits;
    at::Tensor partial;
    if (channels_inner) {
      const int64_t blocks = N * ((C + kTileC - 1) / kTileC);
      splits = choose_splits(blocks, S, 64, sms);
      const int64_t chunk = (S + splits - 1) / splits;
      partial = at::empty({N * C * splits}, a.options().dtype(acc));
      channels_kernel<scalar_t, acc_t><<<dim3(blocks, splits), dim3(kTileC, kTileS), 0, stream>>>(
          ap, va, gp, vg, C, S, chunk, splits, partial.data_ptr<acc_t>());
    } else {
      splits = choose_splits(N * C, S, 4 * kRowThreads * kUnroll, sms);
      const int64_t chunk = (S + splits - 1) / splits;
      partial = at::empty({N * C * splits}, a.options().dtype(acc));
      rows_kernel<scalar_t, acc_t><<<N * C * splits, kRowThreads, 0, stream>>>(
          ap, va, gp, vg, C, S, chunk, splits, partial.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t threads = mode == ReduceMode::PerSample ? N * C : C;
    reduce_batch_kernel<acc_t><<<(threads + 255) / 256, 256, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), splits, s.const_data_ptr<acc_t>(), mode, N, C,
        out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(polyprune_ext, CUDA, m) {
  m.impl("taylor_reduce_accumulate_", &taylor_reduce_accumulate_cuda);
}

}  // namespace polyprune
