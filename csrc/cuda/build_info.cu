// What nvcc compiled this build for, reported by polyprune_ext.build_info().
#include <cuda_runtime_api.h>

#include <string>

#define POLYPRUNE_STRINGIFY_(...) #__VA_ARGS__
#define POLYPRUNE_STRINGIFY(...) POLYPRUNE_STRINGIFY_(__VA_ARGS__)

namespace polyprune {

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,860,900) from the -gencode flags of this build.
std::string cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return POLYPRUNE_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace polyprune
