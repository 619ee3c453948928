"""taylor_reduce against a float64 pure-PyTorch reference, over devices, dtypes, layouts and shapes."""

import math

import pytest
import torch

from polyprune_ext import ops
from polyprune_ext.ops import reference
from polyprune_ext.testing import devices

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (N, C, *spatial): odd sizes, N = 1, C = 1, 0 to 3 spatial dims, an empty batch, and one
# spatial size past the kernels' summation blocks. The last five reach the CUDA kernels' other
# paths (launch_plan.h): 16 channels (2 lanes per position in float16 channels_last), channels
# not a whole number of 16-byte vectors, 48 channels of 11 x 11 (8-lane groups), a long row that
# is split, and one spatial position.
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
    (3, 16, 20, 20),
    (2, 20, 9, 9),
    (4, 48, 11, 11),
    (1, 2, 3000),
    (3, 4, 1),
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


def bound(a, g, scale, reduce):
    """What the reference's terms add up to in absolute value, per output element."""
    z_abs = reference.taylor_reduce(a.double().abs(), g.double().abs(), scale.abs(), reduce="per_sample")
    if reduce == "per_sample":
        return z_abs
    if reduce == "sum_sq":
        return z_abs.square().sum(0)
    return z_abs.sum(0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
@pytest.mark.parametrize("reduce", ops.REDUCE_OPTIONS)
def test_matches_float64_reference(device, dtype, layout, shape, reduce):
    a, g, scale = make(shape, dtype, device, layout)
    expected = reference.taylor_reduce(a.double(), g.double(), scale, reduce=reduce)
    tol = ACC_TOL[dtype] * bound(a, g, scale, reduce) + 1e-30

    result = ops.taylor_reduce(a, g, scale, reduce=reduce)
    assert result.dtype == ops.accumulation_dtype(dtype)
    assert result.shape == expected.shape and result.device == a.device
    assert ((result.double() - expected).abs() <= tol).all()

    # The accumulating form adds onto whatever `out` held (poisoned with random values here).
    poison = torch.randn(expected.shape, dtype=result.dtype, device=device) * 100
    out = poison.clone()
    returned = ops.taylor_reduce(a, g, scale, reduce=reduce, out=out)
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
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 9, 11), (2, 40, 7, 7), (1, 33, 40, 40)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reduce", ops.REDUCE_OPTIONS)
def test_mixed_layouts(device, dtype, shape, layout, reduce):
    """act in one layout, grad in the other (the CUDA mixed kernel)."""
    a, g, scale = make(shape, dtype, device, layout)
    g = g.contiguous() if layout == "channels_last" else g.contiguous(memory_format=torch.channels_last)
    expected = reference.taylor_reduce(a.double(), g.double(), scale, reduce=reduce)
    tol = ACC_TOL[dtype] * bound(a, g, scale, reduce) + 1e-30
    assert ((ops.taylor_reduce(a, g, scale, reduce=reduce).double() - expected).abs() <= tol).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reduce", ["sum", "per_sample"])
def test_channel_and_batch_slices(device, dtype, layout, reduce):
    """Views as the scoring hooks make them (a group's channels narrowed out of a layer's
    output, a part of the batch): start addresses off any 16-byte boundary, strides of the
    whole tensor."""
    a, g, scale = make((5, 23, 9, 10), dtype, device, layout)
    for view in (lambda t: t.narrow(1, 3, 13), lambda t: t[1:4], lambda t: t[1:].narrow(1, 1, 8)):
        av, gv = view(a), view(g)
        sv = scale[: av.shape[0]]
        expected = reference.taylor_reduce(av.double(), gv.double(), sv, reduce=reduce)
        tol = ACC_TOL[dtype] * bound(av, gv, sv, reduce) + 1e-30
        assert ((ops.taylor_reduce(av, gv, sv, reduce=reduce).double() - expected).abs() <= tol).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_scale_dtype_and_stride(device, dtype):
    """scale in any floating dtype and at any stride gives the bits of its conversion to out's
    dtype (the kernels read float32 and float64 scales in place, others are converted)."""
    a, g, scale = make((3, 5, 6, 7), dtype, device, "contiguous")
    for reduce in ops.REDUCE_OPTIONS:
        expected = ops.taylor_reduce(a, g, scale.to(ops.accumulation_dtype(dtype)), reduce=reduce)
        wide = torch.stack([scale, scale * 7]).t().reshape(-1)  # scale at stride 2
        for s in (scale.double(), scale.float(), scale.half().float(), wide[::2]):
            assert torch.equal(ops.taylor_reduce(a, g, s, reduce=reduce),
                               ops.taylor_reduce(a, g, s.to(expected.dtype).contiguous(), reduce=reduce))
        assert torch.equal(ops.taylor_reduce(a, g, wide[::2].double(), reduce=reduce), expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduce", ["sum", "per_sample"])
def test_out_sharing_memory_with_act_or_grad_is_refused(device, reduce):
    buffer = torch.zeros(250, device=device)
    a, g, _ = make((2, 3, 4, 4), torch.float32, device, "contiguous")
    shape = (2, 3) if reduce == "per_sample" else (3,)
    size = math.prod(shape)
    act_in_buffer = buffer[:96].view(2, 3, 4, 4).copy_(a)
    grad_in_buffer = buffer[110:206].view(2, 3, 4, 4).copy_(g)
    out = buffer[92:92 + size].view(shape)  # overlaps act's last floats
    with pytest.raises(ValueError, match="out shares memory with act"):
        ops.taylor_reduce(act_in_buffer, g, reduce=reduce, out=out)
    out = buffer[200:200 + size].view(shape)  # inside grad
    with pytest.raises(ValueError, match="out shares memory with grad"):
        ops.taylor_reduce(a, grad_in_buffer, reduce=reduce, out=out)
    # Next to both but not overlapping: fine.
    out = buffer[96:96 + math.prod(shape)].view(shape)
    ops.taylor_reduce(act_in_buffer, grad_in_buffer, reduce=reduce, out=out)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduce", ops.REDUCE_OPTIONS)
def test_scale_sharing_memory_with_out_is_read_before_out_changes(device, reduce):
    """scale = out[0, :N] (the review's example): the op reads scale as it was before the call,
    like ``out += f(scale.clone())``, on every device."""
    a, g, _ = make((3, 4, 5, 5), torch.float32, device, "contiguous")
    out = torch.rand(3, 4, device=device) + 0.5 if reduce == "per_sample" else torch.rand(4, device=device) + 0.5
    scale = out.view(-1)[:3]
    expected = out + reference.taylor_reduce(a, g, scale.clone(), reduce=reduce)
    ops.taylor_reduce(a, g, scale, reduce=reduce, out=out)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_deterministic(device, layout):
    a, g, scale = make((4, 64, 45, 47), torch.float32, device, layout)
    first = ops.taylor_reduce(a, g, scale, reduce="sum")
    assert torch.equal(first, ops.taylor_reduce(a, g, scale, reduce="sum"))
    if device == "cpu":  # nor does the thread count change any bit
        threads = torch.get_num_threads()
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                assert torch.equal(first, ops.taylor_reduce(a, g, scale, reduce="sum"))
        finally:
            torch.set_num_threads(threads)


def test_accumulating_over_batches_equals_one_big_batch():
    a, g, scale = make((6, 5, 8, 8), torch.float64, "cpu", "contiguous")
    out = torch.zeros(5, dtype=torch.float64)
    for part in range(3):
        rows = slice(2 * part, 2 * part + 2)
        ops.taylor_reduce(a[rows], g[rows], scale[rows], reduce="sum", out=out)
    torch.testing.assert_close(out, ops.taylor_reduce(a, g, scale, reduce="sum"))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduce", ops.REDUCE_OPTIONS)
def test_opcheck(device, dtype, reduce):
    a, g, scale = make((2, 3, 5, 4), dtype, device, "channels_last")
    shape = (2, 3) if reduce == "per_sample" else (3,)
    out = torch.zeros(shape, device=device)
    torch.library.opcheck(torch.ops.polyprune_ext.taylor_reduce_accumulate_.default,
                          (out, a, g, scale.float(), reduce))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    def abs_taylor_score(act, grad, scale):
        return ops.taylor_reduce(act, grad, scale, reduce="sum").abs() + 1

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
        (ValueError, "reduce must be one of", dict(act=a, grad=g, reduce="mean")),
        (ValueError, r"scale must have shape \(N,\)", dict(act=a, grad=g, scale=scale[:1])),
        (TypeError, "scale must be floating", dict(act=a, grad=g, scale=torch.ones(2, dtype=torch.long))),
        (ValueError, r"out must have shape \(C,\)", dict(act=a, grad=g, out=torch.zeros(4))),
        (ValueError, r"out must have shape \(N, C\)", dict(act=a, grad=g, reduce="per_sample", out=torch.zeros(3))),
        (TypeError, "out must be Float", dict(act=a, grad=g, out=torch.zeros(3, dtype=torch.float64))),
        (ValueError, "contiguous", dict(act=a, grad=g, reduce="per_sample", out=torch.zeros(3, 2).t())),
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
