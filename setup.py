"""Builds polyprune_ext._C: CPU kernels always, CUDA kernels when they can be compiled.

Environment switches:
  POLYPRUNE_CUDA=auto (default)  CUDA kernels when nvcc (CUDA_HOME) and a CUDA build of torch exist,
                                 with or without a GPU on this machine
  POLYPRUNE_CUDA=0               CPU kernels only
  POLYPRUNE_CUDA=1               CUDA kernels required: the build fails when they cannot be built
  CUDA_HOME                      the CUDA toolkit (default: /usr/local/cuda, else nvcc's on PATH)
  TORCH_CUDA_ARCH_LIST           GPU architectures to compile for; with none set and no GPU visible,
                                 DEFAULT_ARCHS below rather than torch's list of every architecture
"""

import glob
import os

import torch
from setuptools import setup

# torch looks for the toolkit through `which nvcc` before /usr/local/cuda; a wrapper script on PATH
# (/usr/local/bin/nvcc) would then hide the libraries. Prefer the standard install when it exists.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME when imported)

DEFAULT_ARCHS = "8.0;8.6;9.0+PTX"  # A100, RTX 30xx/A10/L4-class, H100/H200 (+PTX for newer GPUs)


def cuda_wanted():
    switch = os.environ.get("POLYPRUNE_CUDA", "auto").lower()
    if switch not in ("auto", "0", "1"):
        raise SystemExit(f"POLYPRUNE_CUDA must be auto, 0 or 1, got {switch!r}")
    missing = []
    if cpp_extension.CUDA_HOME is None:
        missing.append("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build")
    if switch == "1" and missing:
        raise SystemExit("POLYPRUNE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    return switch != "0" and not missing, missing


def extension():
    with_cuda, missing = cuda_wanted()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP code; without the flag it runs on one thread.
    # -fno-wrapv undoes Python's -fwrapv, which stops GCC from vectorizing the fp32 dot product
    # well (measured: half the memory bandwidth).
    extra = {"cxx": ["-O3", "-fopenmp", "-fno-wrapv"]}
    macros = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "-lineinfo"]
        macros.append(("POLYPRUNE_WITH_CUDA", None))
        kind = cpp_extension.CUDAExtension
    else:
        kind = cpp_extension.CppExtension
    print("polyprune_ext build configuration:")
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda})")
    print("  CPU kernels: yes")
    if with_cuda:
        print(f"  CUDA kernels: yes, nvcc from {cpp_extension.CUDA_HOME}, "
              f"archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        print(f"  CUDA kernels: no ({'; '.join(missing) or 'POLYPRUNE_CUDA=0'})")
    return kind("polyprune_ext._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
                define_macros=macros)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
