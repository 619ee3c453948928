"""What only a GPU can check: the CUDA kernels' paths, streams, graphs, a second GPU, inputs
over 2^31 elements, and compaction in several scratch batches. Every test here skips without
CUDA; benchmarks/gpu_check.sh runs them on a machine with one. (The CPU-and-CUDA tests of
test_taylor_reduce.py and test_compact.py cover every dtype, layout and reduce on both devices.)
"""

import pytest
import torch

from polyprune_ext import _C, ops
from polyprune_ext.ops import reference
from test_taylor_reduce import ACC_TOL, bound, make

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


def free_gib():
    return torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else 0.0


def assert_matches_reference(result, a, g, scale, reduce):
    expected = reference.taylor_reduce(a.double(), g.double(), scale, reduce=reduce)
    tol = ACC_TOL[a.dtype] * bound(a, g, scale, reduce) + 1e-30
    assert ((result.double() - expected).abs() <= tol).all()


# (shape, dtype, layout of act, layout of grad, the plan's kernel, vector width > 1)
PATHS = [
    ((16, 512, 11, 11), torch.float32, "contiguous", "contiguous", "rows", True),  # 8-lane groups
    ((4, 64, 44, 44), torch.bfloat16, "contiguous", "contiguous", "rows", True),  # 32 lanes
    ((2, 3, 20, 20), torch.float16, "strided", "strided", "rows", False),  # scalar, any stride
    ((64, 300), torch.float32, "contiguous", "contiguous", "rows", False),  # (N, C): a lane per row
    ((1, 4, 700, 700), torch.float32, "contiguous", "contiguous", "rows", True),  # split rows
    ((16, 512, 11, 11), torch.float16, "channels_last", "channels_last", "channels", True),
    ((16, 16, 88, 88), torch.float16, "channels_last", "channels_last", "channels", True),  # 2 lanes
    ((4, 20, 30, 30), torch.float16, "channels_last", "channels_last", "channels", False),
    ((4, 64, 30, 30), torch.float64, "channels_last", "channels_last", "channels", True),
    ((4, 40, 30, 30), torch.float32, "contiguous", "channels_last", "mixed", False),
    ((4, 40, 30, 30), torch.bfloat16, "channels_last", "contiguous", "mixed", False),
]


def layout(t, name):
    if name == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if name == "strided":
        return torch.cat([t, t], -1)[..., ::2]
    return t.contiguous()


@pytest.mark.parametrize("shape,dtype,a_layout,g_layout,kernel,vector", PATHS, ids=str)
@pytest.mark.parametrize("reduce", ops.REDUCE_OPTIONS)
def test_cuda_every_kernel_path(shape, dtype, a_layout, g_layout, kernel, vector, reduce):
    """Each kernel, with and without 16-byte loads, against the float64 reference; the same bits
    twice; no scale the same as a scale of ones."""
    a, g, scale = make(shape, dtype, "cuda", "contiguous")
    a, g = layout(a, a_layout), layout(g, g_layout)
    plan = _C._cuda_reduce_plan(a, g, reduce == "per_sample")
    assert plan["kernel"] == kernel and (plan["vec"] > 1) == vector, plan
    first = ops.taylor_reduce(a, g, scale, reduce=reduce)
    assert_matches_reference(first, a, g, scale, reduce)
    assert torch.equal(first, ops.taylor_reduce(a, g, scale, reduce=reduce))
    assert torch.equal(ops.taylor_reduce(a, g, None, reduce=reduce),
                       ops.taylor_reduce(a, g, torch.ones_like(scale, dtype=torch.float32), reduce=reduce))


def test_cuda_every_finish_is_reached():
    """PATHS reaches every finish on this GPU: direct, the last block, the finish kernel."""
    finishes = set()
    for shape, dtype, a_layout, g_layout, _, _ in PATHS:
        a = layout(torch.empty(shape, device="cuda", dtype=dtype), a_layout)
        g = layout(torch.empty(shape, device="cuda", dtype=dtype), g_layout)
        for per_sample in (False, True):
            finishes.add(_C._cuda_reduce_plan(a, g, per_sample)["finish"])
    assert finishes == {"direct", "last_block", "kernel"}


def test_cuda_side_stream_and_graph():
    """The ops run on the current stream: inputs made on a busy side stream are read after they
    are written, and a CUDA graph captured there replays to the same bits."""
    a, g, scale = make((16, 64, 30, 30), torch.float32, "cuda", "channels_last")
    expected = {reduce: ops.taylor_reduce(a, g, scale, reduce=reduce) for reduce in ops.REDUCE_OPTIONS}
    weight = torch.randn(1024, 512, 3, 3, device="cuda")
    keep = torch.arange(0, 1024, 3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # on the wrong stream, the op would read a2, g2 too early
        a2, g2, w2 = a * 1, g * 1, weight.clone()
        results = {reduce: ops.taylor_reduce(a2, g2, scale, reduce=reduce) for reduce in ops.REDUCE_OPTIONS}
        ops.compact_(w2, keep, 0)
    torch.cuda.current_stream().wait_stream(side)
    for reduce in ops.REDUCE_OPTIONS:
        assert torch.equal(results[reduce], expected[reduce])
    assert torch.equal(w2, weight[keep])

    outs = {reduce: torch.zeros_like(expected[reduce]) for reduce in ops.REDUCE_OPTIONS}
    graph = torch.cuda.CUDAGraph()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for reduce in ops.REDUCE_OPTIONS:  # warm-up outside the capture
            ops.taylor_reduce(a, g, scale, reduce=reduce)
        with torch.cuda.graph(graph, stream=side):
            for reduce in ops.REDUCE_OPTIONS:
                ops.taylor_reduce(a, g, scale, reduce=reduce, out=outs[reduce])
    torch.cuda.current_stream().wait_stream(side)
    for replays in (1, 2):  # each replay adds the result into outs once more
        graph.replay()
        torch.cuda.synchronize()
        for reduce in ops.REDUCE_OPTIONS:
            assert torch.equal(outs[reduce], replays * expected[reduce])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU")
def test_cuda_second_gpu():
    """Inputs on cuda:1 while cuda:0 is current: the kernels run there (their own SM count and
    occupancy), and give cuda:0's bits when both GPUs are the same model."""
    assert torch.cuda.current_device() == 0
    same_model = torch.cuda.get_device_name(0) == torch.cuda.get_device_name(1)
    for fmt in ("contiguous", "channels_last"):
        a, g, scale = make((16, 512, 11, 11), torch.bfloat16, "cuda:1", fmt)
        for reduce in ops.REDUCE_OPTIONS:
            result = ops.taylor_reduce(a, g, scale, reduce=reduce)
            assert result.device == torch.device("cuda:1")
            assert_matches_reference(result, a, g, scale, reduce)
            if same_model:
                on_0 = ops.taylor_reduce(a.to("cuda:0"), g.to("cuda:0"), scale.to("cuda:0"), reduce=reduce)
                assert torch.equal(result.cpu(), on_0.cpu())
    weight = torch.randn(1024, 512, 3, 3, device="cuda:1")
    expected = weight[1::2].clone()
    ops.compact_(weight, range(1, 1024, 2), 0)
    assert torch.equal(weight, expected)


def assert_matches_reference_in_slices(result, a, g, scale, reduce, elements=2**26):
    """assert_matches_reference without float64 copies of whole 4 GB inputs: the reference and
    its error bound slice by slice of the batch, or of the row when there is one sample."""
    tol = ACC_TOL[a.dtype]
    if a.shape[0] == 1:  # one long row (N = C = 1): float64 sums of its pieces
        z = bound_ = 0.0
        for i in range(0, a.shape[-1], elements):
            p = a[..., i:i + elements].double() * g[..., i:i + elements].double()
            z, bound_ = z + float(p.sum()), bound_ + float(p.abs().sum())
        s = float(scale[0])
        assert abs(float(result.sum()) - s * z) <= tol * abs(s) * bound_
        return
    step = max(1, elements // a[0].numel())
    total = total_bound = 0
    for i in range(0, a.shape[0], step):
        rows = slice(i, i + step)
        z = reference.taylor_reduce(a[rows].double(), g[rows].double(), scale[rows], reduce="per_sample")
        z_bound = reference.taylor_reduce(a[rows].double().abs(), g[rows].double().abs(),
                                          scale[rows].abs(), reduce="per_sample")
        if reduce == "per_sample":
            assert ((result[rows].double() - z).abs() <= tol * z_bound + 1e-30).all()
        else:  # "sum"
            total, total_bound = total + z.sum(0), total_bound + z_bound.sum(0)
    if reduce != "per_sample":
        assert ((result.double() - total).abs() <= tol * total_bound + 1e-30).all()


# Inputs over 2^31 elements: one row of 2^31 + 13, 2^31 + 16 rows of one element (the review's
# item 1: N * C >= 2^31 rows), and a channels_last tensor whose offsets pass 2^31.
HUGE = [
    ((1, 1, 2**31 + 13), "contiguous", "rows"),
    ((2**31 + 16, 1), "contiguous", "rows"),
    ((2**15 + 1, 64, 32, 32), "channels_last", "channels"),
]


@pytest.mark.skipif(free_gib() < 48, reason="needs 48 GiB of free GPU memory")
@pytest.mark.parametrize("shape,fmt,kernel", HUGE, ids=str)
@pytest.mark.parametrize("reduce", ["sum", "per_sample"])
def test_cuda_over_2_31_elements(shape, fmt, kernel, reduce):
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen)
    g = torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen)
    if fmt == "channels_last":
        a, g = (t.contiguous(memory_format=torch.channels_last) for t in (a, g))
    assert a.numel() > 2**31
    scale = torch.rand(shape[0], device="cuda", generator=gen) + 0.5
    plan = _C._cuda_reduce_plan(a, g, reduce == "per_sample")
    assert plan["kernel"] == kernel and plan["blocks"] < 2**31
    result = ops.taylor_reduce(a, g, scale, reduce=reduce)
    assert result.shape == ((shape[0], shape[1]) if reduce == "per_sample" else (shape[1],))
    assert_matches_reference_in_slices(result, a, g, scale, reduce)


COMPACT = [
    # (shape, dtype, memory format, dim, keep): plan path
    ((1024, 512, 3, 3), torch.float32, torch.contiguous_format, 0, range(0, 1024, 3)),  # batches
    ((256, 2048, 3, 3), torch.float16, torch.channels_last, 1, range(1, 2048, 2)),  # batches
    ((512, 256, 3, 3), torch.bfloat16, torch.channels_last, 0, range(5, 512, 2)),
    ((4096, 1024), torch.complex128, torch.contiguous_format, 1, range(0, 1024, 4)),
    ((300, 1000), torch.uint8, torch.contiguous_format, 0, range(1, 300, 7)),
    ((64, 32, 3, 3), torch.float32, torch.contiguous_format, 0, range(0, 64, 2)),  # one block
    ((512,), torch.float32, torch.contiguous_format, 0, range(3, 512, 5)),  # one block
]


@pytest.mark.parametrize("shape,dtype,fmt,dim,keep", COMPACT, ids=str)
def test_cuda_compaction_paths_and_scratch_bound(shape, dtype, fmt, dim, keep):
    """The result of index_select, in place, allocating at most 1/8 of the tensor (plus keep on
    the GPU and the allocator's rounding), through one block or in several batches."""
    t = (torch.randn(shape, device="cuda") * 100).to(dtype).contiguous(memory_format=fmt)
    keep = torch.tensor(list(keep))
    expected = t.index_select(dim, keep.cuda())
    K = shape[dim]
    inner = 1 if K == 1 else t.stride(dim)
    plan = _C._plan_compact(t.numel() // (K * inner), K, inner, keep.tolist(), t.element_size(),
                            t.data_ptr(), t.numel())
    if t.nbytes > 8 * 2**20:
        assert not plan["one_block"] and plan["batches"] >= 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ops.compact_(t, keep, dim)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= t.untyped_storage().nbytes() // 8 + keep.numel() * 8 + 2 * 512
    assert torch.equal(t, expected) and t.is_contiguous(memory_format=fmt)
