"""taylor_reduce against a float64 pure-PyTorch reference, over devices, dtypes, layouts and shapes."""

import pytest
import torch

from polyprune_ext.testing import devices
from polyprune_ext import ops
from polyprune_ext.ops import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (N, C, *spatial): odd sizes, N = 1, C = 1, 0 to 3 spatial dims, an empty batch, and one
# spatial size past the kernels' summation blocks.
SHAPES = [
    (2, 5, 17, 13),
    (1, 1, 9, 7),
    (3, 1, 5, 5),
    (1, 70, 3, 3),
    (2, 300, 4, 5),
    (4, 6, 31),
    (2, 3, 5, 6, 7),
    (5, 11),
    (0, 4, 6, 6),
    (2, 3, 97, 101),
]
# channels_last needs 2 or 3 spatial dims, a strided view at least one.
CASES = [(shape, "contiguous") for shape in SHAPES]
CASES += [(shape, "channels_last") for shape in SHAPES if len(shape) in (4, 5)]
CASES += [(shape, "strided") for shape in SHAPES if len(shape) > 2]
CASES += [(shape, "sliced") for shape in SHAPES if len(shape) > 3]
# Bound on |ours - float64| relative to the sum of |terms|: inputs are exact in float64, so only
# the accumulation (float32, or float64 for float64 inputs) rounds.
ACC_TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}


def make(shape, dtype, device, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    a, g = a.to(device, dtype), g.to(device, dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if a.dim() == 4 else torch.channels_last_3d
        a, g = a.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    elif layout == "strided":
        # Every other element of the last dim: spatial positions one stride apart, not adjacent.
        a = torch.cat([a, a], -1)[..., ::2]
        g = torch.cat([g, g], -1)[..., ::2]
    elif layout == "sliced":
        # A slice of a wider tensor: the spatial dims no longer form one strided run.
        a = torch.cat([a, a], -1)[..., : shape[-1]]
        g = torch.cat([g, g], -1)[..., : shape[-1]]
    scale = torch.rand(shape[0], generator=gen, dtype=torch.float64).to(device) + 0.5
    return a, g, scale


def bound(a, g, scale, mode):
    """What the reference's terms add up to in absolute value, per output element."""
    z_abs = reference.taylor_reduce(a.double().abs(), g.double().abs(), scale.abs(), mode="per_sample")
    if mode == "per_sample":
        return z_abs
    if mode == "sum_sq":
        return z_abs.square().sum(0)
    return z_abs.sum(0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
@pytest.mark.parametrize("mode", ops.MODES)
def test_matches_float64_reference(device, dtype, layout, shape, mode):
    a, g, scale = make(shape, dtype, device, layout)
    expected = reference.taylor_reduce(a.double(), g.double(), scale, mode=mode)
    tol = ACC_TOL[dtype] * bound(a, g, scale, mode) + 1e-30

    result = ops.taylor_reduce(a, g, scale, mode=mode)
    assert result.dtype == ops.accumulation_dtype(dtype)
    assert result.shape == expected.shape and result.device == a.device
    assert ((result.double() - expected).abs() <= tol).all()

    # The accumulating form adds onto whatever `out` held (poisoned with random values here).
    poison = torch.randn(expected.shape, dtype=result.dtype, device=device) * 100
    out = poison.clone()
    returned = ops.taylor_reduce(a, g, scale, mode=mode, out=out)
    assert returned is out
    # ... plus one rounding of the final addition.
    add_tol = torch.finfo(out.dtype).eps * (poison.double().abs() + expected.abs())
    assert ((out.double() - poison.double() - expected).abs() <= tol + add_tol).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_scale_means_unit_scale(device, dtype):
    a, g, _ = make((3, 4, 7, 7), dtype, device, "contiguous")
    ones = torch.ones(3, device=device)
    torch.testing.assert_close(ops.taylor_reduce(a, g), ops.taylor_reduce(a, g, ones), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mixed_layouts(device, layout):
    a, g, scale = make((2, 8, 9, 11), torch.float32, device, layout)
    g = g.contiguous() if layout == "channels_last" else g.contiguous(memory_format=torch.channels_last)
    expected = reference.taylor_reduce(a.double(), g.double(), scale, mode="per_sample")
    tol = ACC_TOL[torch.float32] * bound(a, g, scale, "per_sample")
    assert ((ops.taylor_reduce(a, g, scale, mode="per_sample").double() - expected).abs() <= tol).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_deterministic(device, layout):
    a, g, scale = make((4, 64, 45, 47), torch.float32, device, layout)
    first = ops.taylor_reduce(a, g, scale, mode="sum")
    assert torch.equal(first, ops.taylor_reduce(a, g, scale, mode="sum"))
    if device == "cpu":  # nor does the thread count change any bit
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(first, ops.taylor_reduce(a, g, scale, mode="sum"))
        finally:
            torch.set_num_threads(threads)


def test_accumulating_over_batches_equals_one_big_batch():
    a, g, scale = make((6, 5, 8, 8), torch.float64, "cpu", "contiguous")
    out = torch.zeros(5, dtype=torch.float64)
    for part in range(3):
        rows = slice(2 * part, 2 * part + 2)
        ops.taylor_reduce(a[rows], g[rows], scale[rows], mode="sum", out=out)
    torch.testing.assert_close(out, ops.taylor_reduce(a, g, scale, mode="sum"))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ops.MODES)
def test_opcheck(device, dtype, mode):
    a, g, scale = make((2, 3, 5, 4), dtype, device, "channels_last")
    shape = (2, 3) if mode == "per_sample" else (3,)
    out = torch.zeros(shape, device=device)
    torch.library.opcheck(torch.ops.polyprune_ext.taylor_reduce_accumulate_.default,
                          (out, a, g, scale.float(), mode))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    def abs_taylor_score(act, grad, scale):
        return ops.taylor_reduce(act, grad, scale, mode="sum").abs() + 1

    a, g, scale = make((2, 4, 6, 6), torch.float32, device, "contiguous")
    compiled = torch.compile(abs_taylor_score, fullgraph=True)
    torch.testing.assert_close(compiled(a, g, scale), abs_taylor_score(a, g, scale))


def test_error_cases():
    a, g, scale = make((2, 3, 4, 4), torch.float32, "cpu", "contiguous")
    cases = [
        (ValueError, "shape", dict(act=a, grad=g[:, :2])),
        (TypeError, "dtype", dict(act=a, grad=g.double())),
        (TypeError, "dtype must be", dict(act=a.int(), grad=g.int())),
        (ValueError, "spatial", dict(act=a[0, 0, 0], grad=g[0, 0, 0])),
        (ValueError, "spatial", dict(act=a.reshape(2, 3, 2, 2, 2, 2), grad=g.reshape(2, 3, 2, 2, 2, 2))),
        (ValueError, "mode must be one of", dict(act=a, grad=g, mode="mean")),
        (ValueError, r"scale must have shape \(N,\)", dict(act=a, grad=g, scale=scale[:1])),
        (TypeError, "scale must be floating", dict(act=a, grad=g, scale=torch.ones(2, dtype=torch.long))),
        (ValueError, r"out must have shape \(C,\)", dict(act=a, grad=g, out=torch.zeros(4))),
        (ValueError, r"out must have shape \(N, C\)", dict(act=a, grad=g, mode="per_sample", out=torch.zeros(3))),
        (TypeError, "out must be Float", dict(act=a, grad=g, out=torch.zeros(3, dtype=torch.float64))),
        (ValueError, "contiguous", dict(act=a, grad=g, mode="per_sample", out=torch.zeros(3, 2).t())),
    ]
    for error, message, kwargs in cases:
        act, grad = kwargs.pop("act"), kwargs.pop("grad")
        with pytest.raises(error, match=message):
            ops.taylor_reduce(act, grad, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_device_mismatch():
    a, g, scale = make((2, 3, 4, 4), torch.float32, "cuda", "contiguous")
    with pytest.raises(ValueError, match="grad is on"):
        ops.taylor_reduce(a, g.cpu())
    with pytest.raises(ValueError, match="scale is on"):
        ops.taylor_reduce(a, g, scale.cpu())
    with pytest.raises(ValueError, match="out is on"):
        ops.taylor_reduce(a, g, out=torch.zeros(3))
