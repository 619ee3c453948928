import torch

import polyprune_ext


def test_build_info():
    info = polyprune_ext.build_info()
    assert info["cpu"] is True
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_archs"]
    # A usable GPU with a build that lacks the CUDA kernels would make every CUDA test fail
    # with a dispatcher error; say so plainly instead.
    assert info["cuda"] or not torch.cuda.is_available(), "GPU present but CUDA kernels not built"


def test_kernels_registered_for_the_built_devices():
    keys = ["CPU"] + (["CUDA"] if polyprune_ext.build_info()["cuda"] else [])
    for op in ("taylor_reduce_accumulate_", "compact_"):
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"polyprune_ext::{op}", key)
