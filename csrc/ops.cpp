// The op schemas (one place for all of them) and the Python module `polyprune_ext._C`.
//
// Kernels live beside this file, one folder per dispatch key: cpu/ always, cuda/ when the package
// is built with CUDA. Each registers itself with TORCH_LIBRARY_IMPL; fake (meta) kernels are
// registered from Python in polyprune_ext/ops.py so torch.compile can trace the ops.
#include <torch/extension.h>

#include <string>

namespace polyprune {
void bind_launch_plan(pybind11::module& m);  // plan_py.cpp: private functions for the tests
}  // namespace polyprune

#ifdef POLYPRUNE_WITH_CUDA
namespace polyprune {
std::string cuda_arch_list();  // from cuda/build_info.cu: the archs nvcc compiled for
int cuda_runtime_version();    // CUDART_VERSION seen by nvcc
}  // namespace polyprune
#endif

TORCH_LIBRARY(polyprune_ext, m) {
  // out += reduce_n(scale[n] * sum_spatial(act * grad)); see polyprune_ext.ops.taylor_reduce.
  m.def(
      "taylor_reduce_accumulate_(Tensor(a!) out, Tensor act, Tensor grad, Tensor? scale, "
      "str reduce) -> ()");
  // Moves the slices `keep` of `dim` to the front of tensor's storage; see polyprune_ext.ops.compact_.
  // (The first argument is called `tensor`: one named `self` breaks torch < 2.5's auto_functionalized,
  // so opcheck and torch.compile fail there with "got multiple values for argument 'self'".)
  m.def("compact_(Tensor(a!) tensor, Tensor keep, int dim) -> ()");
}

static pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef POLYPRUNE_WITH_CUDA
  const int v = polyprune::cuda_runtime_version();
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  info["cuda_archs"] = polyprune::cuda_arch_list();
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = pybind11::none();
#endif
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "Which kernels this build of polyprune_ext compiled in.");
  polyprune::bind_launch_plan(m);
}
