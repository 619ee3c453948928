// compact_ on CUDA, in bounded batches. Threads run in no fixed order, so moving slices in place
// in one kernel could overwrite a slice before it is read. Instead each batch gathers the next run
// of kept elements into a small scratch buffer and copies it back to the front. Destinations lie
// at or before their sources and both advance monotonically, so a batch never writes over a
// source of a later batch. The scratch holds at most 1/8 of the tensor (at least 1 MiB, at most
// what is kept), never a copy of the whole tensor.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../compact.h"

namespace polyprune {
namespace {

// scratch[i - first] = data[source of new element i], for new elements i in [first, first + count).
template <typename Word>
__global__ void gather_kept_kernel(const Word* __restrict__ data, const int64_t* __restrict__ keep,
                                   CompactPlan p, int64_t first, int64_t count,
                                   Word* __restrict__ scratch) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= count) return;
  const int64_t i = first + t;
  const int64_t period = p.kept * p.inner;
  const int64_t o = i / period, j = (i % period) / p.inner, e = i % p.inner;
  scratch[t] = data[(o * p.K + keep[j]) * p.inner + e];
}

template <typename Word>
void compact_words(at::Tensor& self, const at::Tensor& keep_cpu, const CompactPlan& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = p.outer * p.kept * p.inner;  // elements kept
  if (total == 0) return;
  const int64_t cap_bytes = std::max<int64_t>(self.nbytes() / 8, int64_t(1) << 20);
  const int64_t batch = std::min<int64_t>(total, std::max<int64_t>(1, cap_bytes / sizeof(Word)));
  const at::Tensor keep = keep_cpu.to(self.device(), /*non_blocking=*/false);
  const at::Tensor scratch = at::empty({batch * static_cast<int64_t>(sizeof(Word))},
                                       self.options().dtype(at::kByte));
  auto* data = static_cast<Word*>(self.data_ptr());
  auto* buf = static_cast<Word*>(scratch.data_ptr());
  for (int64_t first = 0; first < total; first += batch) {
    const int64_t count = std::min(batch, total - first);
    gather_kept_kernel<Word><<<(count + 255) / 256, 256, 0, stream>>>(
        data, keep.const_data_ptr<int64_t>(), p, first, count, buf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    C10_CUDA_CHECK(cudaMemcpyAsync(data + first, buf, count * sizeof(Word),
                                   cudaMemcpyDeviceToDevice, stream));
  }
}

void compact_cuda(at::Tensor self, const at::Tensor& keep, int64_t dim) {
  const CompactPlan p = check_compact_inputs(self, keep, dim);
  const c10::cuda::CUDAGuard guard(self.device());
  // Data are moved as opaque words of the element size, so every dtype is served.
  switch (self.element_size()) {
    case 1: return compact_words<uint8_t>(self, keep, p);
    case 2: return compact_words<uint16_t>(self, keep, p);
    case 4: return compact_words<uint32_t>(self, keep, p);
    case 8: return compact_words<uint64_t>(self, keep, p);
    default: TORCH_CHECK(false, "compact_: unsupported element size ", self.element_size());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(polyprune_ext, CUDA, m) { m.impl("compact_", &compact_cuda); }

}  // namespace polyprune
