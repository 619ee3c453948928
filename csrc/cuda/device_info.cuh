// What the launch planning needs to know about a GPU, asked once per device (and kernel): the
// driver queries take longer than a small reduction does.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

namespace polyprune {

inline int multiprocessor_count(int device) {
  static std::mutex mutex;
  static std::map<int, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it == cache.end()) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    it = cache.emplace(device, sms).first;
  }
  return it->second;
}

// Resident blocks per multiprocessor of `kernel` launched with `threads` threads (and no dynamic
// shared memory) on `device`, which must be the current device.
inline int blocks_per_multiprocessor(const void* kernel, int device, int threads) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, threads);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
    it = cache.emplace(key, std::max(blocks, 1)).first;
  }
  return it->second;
}

}  // namespace polyprune
