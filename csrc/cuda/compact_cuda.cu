// compact_ on CUDA. Threads run in no fixed order, so slices cannot be moved in place one after
// the other as on the CPU. Instead each batch gathers the next run of kept words into a buffer,
// then writes the buffer to the front. Destinations lie at or before their sources and both
// advance monotonically, so a batch never writes over a source of a later batch.
//   - Moves of up to kCompactOneBlockBytes: one block, its shared memory as the buffer (one
//     launch, nothing allocated). Most biases, norm parameters and small conv weights.
//   - Larger moves: a scratch buffer of at most 1/8 of the tensor (at least one element), one
//     gather kernel and one device-to-device copy per batch.
// Nothing is launched when nothing moves (keep is a prefix). Data move as opaque words of up to
// 16 bytes (launch_plan.h: plan_compact_copy), so every dtype, complex128 included, is served.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../compact.h"
#include "../launch_plan.h"
#include "device_info.cuh"

namespace polyprune {
namespace {

constexpr int kOneBlockThreads = 1024;     // one block: as many loads in flight as it can hold
constexpr int kOneBlockTileBytes = 16384;  // its buffer: one 16-byte word per thread
constexpr int kGatherThreads = 256;

template <typename Word>
__global__ void __launch_bounds__(kOneBlockThreads)
    compact_one_block_kernel(Word* data, const int64_t* __restrict__ keep, CompactCopy c,
                             int64_t K, int64_t kept) {
  constexpr int64_t kTileWords = kOneBlockTileBytes / sizeof(Word);
  __shared__ Word tile[kTileWords];
  for (int64_t first = c.first; first < c.total; first += kTileWords) {
    const int64_t count = min(kTileWords, c.total - first);
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x)
      tile[i] = data[compact_source(first + i, K, kept, c.inner_words, keep)];
    __syncthreads();  // every source of this batch read before any destination is written
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) data[first + i] = tile[i];
    __syncthreads();
  }
}

// scratch[i] = compacted word first + i, for i < count.
template <typename Word>
__global__ void __launch_bounds__(kGatherThreads)
    gather_kernel(const Word* __restrict__ data, const int64_t* __restrict__ keep, CompactCopy c,
                  int64_t K, int64_t kept, int64_t first, int64_t count,
                  Word* __restrict__ scratch) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count; i += stride)
    scratch[i] = data[compact_source(first + i, K, kept, c.inner_words, keep)];
}

template <typename Word>
void move_words(at::Tensor& self, const at::Tensor& keep, const CompactPlan& p,
                const CompactCopy& c) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* data = static_cast<Word*>(self.data_ptr());
  const int64_t* k = keep.const_data_ptr<int64_t>();
  if (c.one_block) {
    compact_one_block_kernel<Word><<<1, kOneBlockThreads, 0, stream>>>(data, k, c, p.K, p.kept);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const at::Tensor scratch = at::empty({c.scratch_words * static_cast<int64_t>(sizeof(Word))},
                                       self.options().dtype(at::kByte));
  auto* buf = static_cast<Word*>(scratch.data_ptr());
  const int device = self.get_device();
  const int64_t capacity =
      static_cast<int64_t>(multiprocessor_count(device)) *
      blocks_per_multiprocessor(reinterpret_cast<const void*>(gather_kernel<Word>), device,
                                kGatherThreads);
  for (int64_t first = c.first; first < c.total; first += c.scratch_words) {
    const int64_t count = std::min(c.scratch_words, c.total - first);
    const int64_t blocks = std::clamp<int64_t>(ceil_div(count, kGatherThreads), 1, capacity);
    gather_kernel<Word><<<blocks, kGatherThreads, 0, stream>>>(data, k, c, p.K, p.kept, first,
                                                                 count, buf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    C10_CUDA_CHECK(cudaMemcpyAsync(data + first, buf, count * sizeof(Word),
                                   cudaMemcpyDeviceToDevice, stream));
  }
}

void compact_cuda(at::Tensor self, const at::Tensor& keep_arg, int64_t dim) {
  const CompactPlan p = check_compact_inputs(self, keep_arg, dim);
  const at::Tensor keep = readable_keep(keep_arg, self);
  const CompactCopy c = plan_compact_copy(
      p.outer, p.K, p.inner, p.kept, keep.const_data_ptr<int64_t>(), self.element_size(),
      reinterpret_cast<uint64_t>(self.const_data_ptr()), self.numel());
  if (c.batches == 0) return;  // nothing moves
  const c10::cuda::CUDAGuard guard(self.device());
  const at::Tensor keep_device = keep.to(self.device());
  switch (c.word_bytes) {
    case 1: return move_words<uint8_t>(self, keep_device, p, c);
    case 2: return move_words<uint16_t>(self, keep_device, p, c);
    case 4: return move_words<uint32_t>(self, keep_device, p, c);
    case 8: return move_words<uint64_t>(self, keep_device, p, c);
    default: return move_words<uint4>(self, keep_device, p, c);  // 16 bytes
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(polyprune_ext, CUDA, m) { m.impl("compact_", &compact_cuda); }

}  // namespace polyprune
