"""The CUDA launch planning (csrc/launch_plan.h), compiled for and checked on the CPU.

The plans are compared with values worked out by hand from the rules in launch_plan.h, for the
GPU the kernels were written for (an H200: 132 SMs) and the shapes of the review (issue 18).
The coverage tests walk every task and lane of a plan through the index maps the kernels run
and check that each element of act is read exactly once, and each vector load is aligned.
"""

import math
import random

import pytest
import torch

from polyprune_ext import _C

H200_SMS = 132
FP16, FP32, FP64 = 2, 4, 8  # element sizes


def nchw(N, C, S):
    """(n, c, s) strides of a contiguous (N, C, S) tensor."""
    return [C * S, S, 1]


def nhwc(N, C, S):
    """(n, c, s) strides of a channels_last tensor."""
    return [S * C, 1, C]


def plan(N, C, S, size, a, g=None, *, a_address=0, g_address=None, per_sample=False,
         sms=H200_SMS, blocks_per_sm=4):
    g = a if g is None else g
    g_address = a_address if g_address is None else g_address
    return _C._plan_taylor_reduce(N, C, S, size, a, a_address, g, g_address, per_sample, sms,
                                  blocks_per_sm)


def coverage(N, C, S, size, a, g=None, *, a_address=0, g_address=None, per_sample=False,
             sms=H200_SMS, blocks_per_sm=4):
    g = a if g is None else g
    g_address = a_address if g_address is None else g_address
    return _C._taylor_reduce_coverage(N, C, S, size, a, a_address, g, g_address, per_sample, sms,
                                      blocks_per_sm)


def test_short_nchw_rows_get_8_lane_groups():
    """(16, 512, 11, 11), the review's short-row shape: 8 lanes per 121-element row (31 vectors
    of 4 floats), 32 rows per block, no split (121 < 8 lanes x 4 x 8), one block per 32 rows."""
    p = plan(16, 512, 121, FP32, nchw(16, 512, 121))
    assert p["kernel"] == "rows" and p["vec"] == 4 and p["lanes"] == 8 and p["head"] == 0
    assert p["groups_per_block"] == 32 and p["splits"] == 1 and p["chunk"] == 121
    assert p["tasks"] == 16 * 512 and p["blocks"] == 256
    # mode "sum": each channel sums 16 samples, 8192 partial sums <= 16384: the last block
    # finishes, 2 lanes per channel (16 / 8 loads), each over every other sample.
    assert p["finish"] == "last_block"
    assert p["finish_lanes"] == 2 and p["finish_split_lanes"] == 1
    # per_sample: each (n, c) is one task's sum, added straight into out.
    assert plan(16, 512, 121, FP32, nchw(16, 512, 121), per_sample=True)["finish"] == "direct"


def test_long_nchw_rows_are_split():
    """(16, 64, 176, 176) float32 with 3 resident blocks per SM: 396 resident blocks x 8 warps =
    3168 groups; 1024 rows need ceil(3168 / 1024) = 4 splits of 7744 positions."""
    p = plan(16, 64, 30976, FP32, nchw(16, 64, 30976), blocks_per_sm=3)
    assert p["kernel"] == "rows" and p["vec"] == 4 and p["lanes"] == 32
    assert p["splits"] == 4 and p["chunk"] == 7744 and p["tasks"] == 4096
    assert p["blocks"] == 396  # capped at the resident blocks: a grid-stride loop does the rest
    # 16 x 64 x 4 = 4096 partial sums: last block; 64 per channel, so 8 lanes: 4 over the
    # splits, 2 over the samples.
    assert p["finish"] == "last_block"
    assert p["finish_lanes"] == 8 and p["finish_split_lanes"] == 4


def test_channels_last_short_rows_fill_the_gpu():
    """(16, 512, 11, 11) channels_last float16: 8 channels per 16-byte load, 64 loads per
    position, so 2 tiles of 32 lanes. Positions are split down to 8 per lane (the review:
    the old kernel launched 256 blocks of 4 per SM)."""
    p = plan(16, 512, 121, FP16, nhwc(16, 512, 121))
    assert p["kernel"] == "channels" and p["vec"] == 8 and p["lanes"] == 32 and p["tiles"] == 2
    # 528 resident blocks x 8 warps = 4224 > 32 (n, tile) pairs; at most 121 // 8 = 15 splits,
    # chunk ceil(121 / 15) = 9, so ceil(121 / 9) = 14 splits.
    assert p["chunk"] == 9 and p["splits"] == 14 and p["tasks"] == 448 and p["blocks"] == 56
    # 16 x 512 x 14 = 114688 partial sums: a finish kernel; 224 per channel, so 16 lanes: 8
    # over the splits, 2 over the samples.
    assert p["finish"] == "kernel"
    assert p["finish_lanes"] == 16 and p["finish_split_lanes"] == 8


def test_channels_last_with_16_channels_uses_the_whole_warp():
    """(16, 16, 352, 352) channels_last float16, the largest shape: 2 lanes of 8 channels per
    position, 16 positions per warp load (the old kernel idled half the warp)."""
    p = plan(16, 16, 352 * 352, FP16, nhwc(16, 16, 352 * 352))
    assert p["kernel"] == "channels" and p["vec"] == 8 and p["lanes"] == 2 and p["tiles"] == 1
    # 4224 groups / 16 (n, tile) pairs = 264 splits of ceil(123904 / 264) = 470 positions.
    assert p["splits"] == 264 and p["chunk"] == 470 and p["tasks"] == 4224
    assert p["blocks"] == 528 and p["finish"] == "kernel"
    # 16 x 264 partial sums per channel: 128 lanes (the most), a warp over the splits.
    assert p["finish_lanes"] == 128 and p["finish_split_lanes"] == 32
    p = plan(16, 16, 352 * 352, FP16, nhwc(16, 16, 352 * 352), per_sample=True)
    assert p["finish"] == "kernel" and p["finish_lanes"] == p["finish_split_lanes"] == 32

@pytest.mark.parametrize("C,size,vec,lanes,tiles", [
    (20, FP16, 1, 32, 1),  # 20 % 8 != 0: scalar loads, 20 lanes of 32 busy
    (3, FP32, 1, 4, 1),  # 3 channels: 4 lanes per position, 8 positions per warp load
    (48, FP16, 8, 8, 1),  # 6 vectors: 8 lanes
    (48, FP32, 4, 16, 1),  # 12 vectors: 16 lanes
    (1024, FP32, 4, 32, 8),  # 256 vectors: 8 tiles of 32 lanes
    (64, FP64, 2, 32, 1),  # 2 doubles per load
])
def test_channels_lanes_and_vectors(C, size, vec, lanes, tiles):
    p = plan(4, C, 64, size, nhwc(4, C, 64))
    assert (p["kernel"], p["vec"], p["lanes"], p["tiles"]) == ("channels", vec, lanes, tiles)


def test_channels_vectors_need_aligned_starts():
    strides = nhwc(4, 64, 64)
    assert plan(4, 64, 64, FP32, strides, a_address=16)["vec"] == 4
    assert plan(4, 64, 64, FP32, strides, a_address=4)["vec"] == 1  # a channel slice at offset 1
    assert plan(4, 64, 64, FP32, strides, g_address=8)["vec"] == 1
    # A slice of 64 channels out of 66: position stride 66, not a whole number of vectors.
    assert plan(4, 64, 64, FP32, [64 * 66, 1, 66])["vec"] == 1


def test_rows_vectors_need_the_same_alignment_in_both_operands():
    strides = nchw(2, 3, 100)
    p = plan(2, 3, 100, FP32, strides, a_address=4, g_address=4 + 64)
    assert p["vec"] == 4 and p["head"] == 1  # one scalar, then 16-byte aligned vectors
    assert plan(2, 3, 100, FP32, strides, a_address=4, g_address=8)["vec"] == 1
    assert plan(2, 3, 100, FP32, strides, g=nchw(2, 3, 101))["vec"] == 1  # rows 4 bytes apart
    assert plan(2, 3, 100, FP32, [600, 200, 2])["vec"] == 1  # every other position


@pytest.mark.parametrize("S,lanes", [(1, 1), (7, 1), (8, 8), (256, 8), (257, 16), (512, 16),
                                     (513, 32), (10**6, 32)])
def test_row_group_width(S, lanes):
    """One lane per row below 8 positions; then the narrowest of 8, 16, 32 lanes that gives
    each lane at most 8 vectors of 4 floats."""
    assert plan(2, 3, S, FP32, nchw(2, 3, S))["lanes"] == lanes


def test_mixed_layouts_get_the_transposing_kernel():
    """act NCHW, grad channels_last (or the reverse): 32-channel tiles, whole 32-position tiles."""
    p = plan(2, 40, 25, FP32, nchw(2, 40, 25), nhwc(2, 40, 25))
    assert p["kernel"] == "mixed" and p["lanes"] == 32 and p["tiles"] == 2
    assert p["groups_per_block"] == 4 and p["splits"] == 1 and p["chunk"] == 32
    assert p["tasks"] == 4 and p["blocks"] == 1
    # 2 samples per channel: last block, one lane per channel.
    assert p["finish"] == "last_block" and p["finish_lanes"] == 1
    assert plan(2, 40, 25, FP32, nhwc(2, 40, 25), nchw(2, 40, 25))["kernel"] == "mixed"
    # An expanded gradient (all strides 0) is neither: the rows kernel with scalar loads.
    assert plan(2, 40, 25, FP32, nchw(2, 40, 25), [0, 0, 0])["kernel"] == "rows"


def test_more_than_2_31_tasks_run_on_a_capped_grid():
    """The review's item 1: (N, C) inputs with N * C >= 2^31 rows. Tasks stay 64-bit; the grid
    is the resident blocks, whatever the task count."""
    N = 2**31 + 16
    p = plan(N, 1, 1, FP16, [1, 1, 1], per_sample=True)
    assert p["kernel"] == "rows" and p["lanes"] == 1 and p["tasks"] == N
    assert p["blocks"] == 4 * H200_SMS and p["finish"] == "direct"
    p = plan(N, 1, 1, FP16, [1, 1, 1])
    assert p["finish"] == "kernel"
    assert p["finish_lanes"] == 128 and p["finish_split_lanes"] == 1  # over the samples
    p = plan(2**16, 2**15, 2, FP16, nchw(2**16, 2**15, 2), per_sample=True)
    assert p["tasks"] == 2**31 and p["blocks"] == 4 * H200_SMS


def test_no_more_blocks_than_tasks():
    p = plan(1, 1, 100, FP32, nchw(1, 1, 100))
    assert p["tasks"] == 1 and p["blocks"] == 1 and p["finish"] == "direct"
    p = plan(3, 5, 0, FP32, nchw(3, 5, 0), per_sample=True)  # empty spatial dims
    assert p["splits"] == 1 and p["tasks"] == 15 and p["blocks"] == 1


COVERAGE = [
    # (N, C, S, element size, a strides, g strides, a address, g address)
    (2, 3, 100, FP32, nchw(2, 3, 100), None, 4, 4),  # a head of 3 floats
    (2, 3, 101, FP16, nchw(2, 3, 101), None, 6, 22),  # every row at another offset
    (1, 2, 5000, FP32, nchw(1, 2, 5000), None, 0, 0),  # splits of 1250: heads within rows
    (3, 2, 77, FP64, nchw(3, 2, 77), None, 8, 8),
    (4, 5, 3, FP32, nchw(4, 5, 3), None, 0, 0),  # one lane per row
    (2, 3, 50, FP32, [300, 100, 2], None, 0, 0),  # strided positions
    (2, 16, 4096, FP16, nhwc(2, 16, 4096), None, 0, 0),  # 2 lanes per position, splits
    (3, 20, 50, FP16, nhwc(3, 20, 50), None, 0, 0),  # scalar channels
    (2, 300, 30, FP32, nhwc(2, 300, 30), None, 0, 0),  # 3 tiles, the last partly idle
    (2, 3, 40, FP32, nhwc(2, 3, 40), None, 0, 0),  # 3 channels, 8 positions per warp load
    (1, 40, 1600, FP32, nchw(1, 40, 1600), nhwc(1, 40, 1600), 0, 0),  # mixed, split
    (2, 33, 70, FP16, nhwc(2, 33, 70), nchw(2, 33, 70), 0, 0),  # mixed, partial tiles
]


@pytest.mark.parametrize("N,C,S,size,a,g,a_address,g_address", COVERAGE, ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
def test_every_element_is_read_once(N, C, S, size, a, g, a_address, g_address, per_sample):
    counts = coverage(N, C, S, size, a, g, a_address=a_address, g_address=g_address,
                      per_sample=per_sample)
    assert counts.shape == (N, C, S) and (counts == 1).all()


def test_every_element_is_read_once_random_plans():
    """Random shapes, layouts, offsets and GPU sizes (1 to 200 SMs)."""
    rng = random.Random(0)
    for _ in range(200):
        N, C, S = rng.randint(1, 4), rng.randint(1, 70), rng.choice([1, 2, 7, 8, 9, 63, 121, 700])
        size = rng.choice([FP16, FP32, FP64])
        layouts = [nchw(N, C, S), nhwc(N, C, S)]
        a, g = rng.choice(layouts), rng.choice(layouts)
        address = rng.randrange(0, 64, size)
        counts = coverage(N, C, S, size, a, g, a_address=address, g_address=address + 16 * rng.randint(0, 3),
                          sms=rng.randint(1, 200), blocks_per_sm=rng.randint(1, 8))
        assert (counts == 1).all(), (N, C, S, size, a, g, address)


# ---------------------------------------------------------------------------------------------
# compact_ on CUDA: the copy plan and the scratch cap.


def compact_plan(shape, dim, keep, size, address=0, channels_last=False):
    """Plan for a tensor of `shape` compacted along `dim`, worked out like check_compact_inputs."""
    t = torch.empty(shape, device="meta")
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    K = shape[dim]
    inner = 1 if K == 1 else t.stride(dim)
    outer = math.prod(shape) // (K * inner)
    return _C._plan_compact(outer, K, inner, list(keep), size, address, math.prod(shape))


def test_small_conv_weight_moves_through_one_block():
    """(64, 32, 3, 3) float32, every other output channel: slices of 288 floats (1152 bytes,
    72 words of 16 bytes); slice 0 stays, so 31 slices move (35712 bytes <= 256 KiB)."""
    p = compact_plan((64, 32, 3, 3), 0, range(0, 64, 2), FP32)
    assert p["first_moved"] == 288 and p["word_bytes"] == 16 and p["inner_words"] == 72
    assert p["first"] == 72 and p["total"] == 32 * 72
    assert p["one_block"] and p["scratch_words"] == 0 and p["batches"] == 1


def test_scratch_is_at_most_an_eighth_of_a_tensor_under_8_mib():
    """(256, 256, 3, 3) float32 (2.25 MiB), odd channels: 1/8 is 294912 bytes = 18432 words;
    the old rule (at least 1 MiB) took more than 1/8 of every tensor under 8 MiB."""
    p = compact_plan((256, 256, 3, 3), 0, range(1, 256, 2), FP32)
    nbytes = 256 * 256 * 9 * 4
    assert p["scratch_cap_bytes"] == nbytes // 8 == 294912
    assert p["first"] == 0 and p["total"] == 128 * 576 and not p["one_block"]
    assert p["scratch_words"] == 18432 and p["batches"] == 4
    assert p["scratch_words"] * p["word_bytes"] <= nbytes // 8


def test_large_weight_moves_in_batches():
    """(1024, 512, 3, 3) float32, every third output channel (342 kept): 3 batches of 1/8."""
    p = compact_plan((1024, 512, 3, 3), 0, range(0, 1024, 3), FP32)
    assert p["first_moved"] == 4608 and p["word_bytes"] == 16
    assert p["first"] == 1152 and p["total"] == 342 * 1152
    assert p["scratch_words"] == 4718592 * 4 // 8 // 16 == 147456 and p["batches"] == 3


def test_nothing_moves_when_keep_is_a_prefix():
    assert compact_plan((8, 4), 0, [0, 1, 2], FP32)["batches"] == 0
    assert compact_plan((8, 4), 0, range(8), FP32)["batches"] == 0
    # Along dim 1 only the first row is in place: the second row's slices move.
    p = compact_plan((8, 4), 1, [0, 1, 2], FP32)
    assert p["first_moved"] == 3 and p["batches"] == 1


def test_channels_last_input_channels():
    """dim 1 of a channels_last weight: channels innermost, slices of one element."""
    p = compact_plan((8, 6, 3, 3), 1, [0, 2, 5], FP32, channels_last=True)
    assert p["first_moved"] == 1 and p["word_bytes"] == 4 and p["inner_words"] == 1
    assert p["total"] == 8 * 9 * 3 and p["one_block"]


def test_word_size_follows_slices_and_address():
    assert compact_plan((10, 4), 1, [1, 3], 16)["word_bytes"] == 16  # complex128
    assert compact_plan((64, 8), 0, [1], FP16)["word_bytes"] == 16  # 8 halves per slice
    assert compact_plan((64, 8), 0, [1], FP16, address=2)["word_bytes"] == 2  # storage offset 1
    assert compact_plan((64, 6), 0, [1], FP16)["word_bytes"] == 4  # 12-byte slices
    assert compact_plan((64, 3), 0, [1], 1)["word_bytes"] == 1  # bool / uint8
    # 8 floats: 1/8 is one element, so no word wider than 4 bytes even for 16-byte slices.
    p = compact_plan((2, 4), 0, [1], FP32)
    assert p["scratch_cap_bytes"] == 4 and p["word_bytes"] == 4


def test_scratch_never_exceeds_cap_or_moved_words():
    rng = random.Random(1)
    for _ in range(300):
        shape = (rng.randint(1, 3000), rng.randint(1, 600))
        dim = rng.randint(0, 1)
        K = shape[dim]
        keep = sorted(rng.sample(range(K), rng.randint(1, K)))
        size = rng.choice([1, 2, 4, 8, 16])
        p = compact_plan(shape, dim, keep, size, address=size * rng.randint(0, 8))
        moved_words = p["total"] - p["first"]
        if p["batches"] and not p["one_block"]:
            assert 1 <= p["scratch_words"] <= moved_words
            assert p["scratch_words"] * p["word_bytes"] <= max(1, math.prod(shape) // 8) * size
            assert p["batches"] == -(-moved_words // p["scratch_words"])
