"""compact_ against index_select: same values, same storage, same tensor object."""

import pytest
import torch

from polyprune_ext import ops
from polyprune_ext.ops import reference
from polyprune_ext.testing import devices

# What pruning compacts: conv / conv-transpose / linear weights, biases and norm statistics, in
# float and integer dtypes, contiguous and channels_last.
TENSORS = [
    ((64, 32, 3, 3), torch.float32, torch.contiguous_format),
    ((64, 32, 3, 3), torch.float32, torch.channels_last),
    ((16, 8, 1, 1), torch.float16, torch.channels_last),
    ((8, 5, 3, 3, 3), torch.bfloat16, torch.channels_last_3d),
    ((40, 17), torch.float64, torch.contiguous_format),
    ((33,), torch.float32, torch.contiguous_format),
    ((12, 7, 4), torch.int64, torch.contiguous_format),
    ((9, 1, 3, 3), torch.float32, torch.contiguous_format),
    ((6, 0, 2), torch.float32, torch.contiguous_format),
    # Every element size the CUDA kernel moves as words of 1 to 16 bytes.
    ((16, 6), torch.complex128, torch.contiguous_format),
    ((12, 10, 3), torch.bool, torch.contiguous_format),
    ((8, 6, 3, 3), torch.int16, torch.channels_last),
    ((300, 40), torch.float16, torch.contiguous_format),
]


def random_keep(size, gen):
    count = int(torch.randint(1, size + 1, (1,), generator=gen))
    return torch.randperm(size, generator=gen)[:count].sort().values


def make(shape, dtype, memory_format, device, gen):
    if dtype.is_complex:
        t = torch.randn(shape, generator=gen, dtype=dtype) * 100
    else:
        t = (torch.randn(shape, generator=gen) * 100).to(dtype)
    return t.to(device).contiguous(memory_format=memory_format)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape,dtype,memory_format", TENSORS, ids=str)
@pytest.mark.parametrize("dim", [0, 1])
def test_matches_index_select(device, shape, dtype, memory_format, dim):
    if dim >= len(shape) or shape[dim] == 0:
        pytest.skip("no such dim to compact")
    gen = torch.Generator().manual_seed(hash((shape, dim)) % 2**31)
    for _ in range(5):
        t = make(shape, dtype, memory_format, device, gen)
        keep = random_keep(shape[dim], gen)
        expected = reference.compact(t, keep, dim)
        pointer = t.untyped_storage().data_ptr()
        result = ops.compact_(t, keep.to(device), dim)
        assert result is t
        assert t.untyped_storage().data_ptr() == pointer and t.storage_offset() == 0
        assert t.shape == expected.shape
        assert t.is_contiguous(memory_format=memory_format)
        assert torch.equal(t, expected)


@pytest.mark.parametrize("device", devices())
def test_keep_everything_and_keep_one(device):
    t = torch.arange(24.0, device=device).reshape(4, 6)
    assert torch.equal(ops.compact_(t.clone(), range(4), 0), t)
    assert torch.equal(ops.compact_(t.clone(), [5], 1), t[:, 5:])


@pytest.mark.parametrize("device", devices())
def test_view_with_storage_offset(device):
    base = torch.arange(60.0, device=device)
    t = base[10:].view(5, 10)
    expected = t[[0, 3]].clone()
    ops.compact_(t, [0, 3], 0)
    assert t.storage_offset() == 10 and torch.equal(t, expected)
    assert torch.equal(base[:10], torch.arange(10.0, device=device))  # nothing before it moved


@pytest.mark.parametrize("device", devices())
def test_view_at_an_odd_offset(device):
    """A float16 view one element into its storage: the CUDA kernel moves 2-byte words."""
    base = torch.randn(1 + 64 * 8, device=device).half()
    t = base[1:].view(64, 8)
    expected = t[1::3].clone()
    ops.compact_(t, range(1, 64, 3), 0)
    assert t.storage_offset() == 1 and torch.equal(t, expected)


@pytest.mark.parametrize("device", devices())
def test_nothing_moves_when_keep_is_a_prefix(device):
    t = torch.randn(10, 4, device=device)
    expected = t[:6].clone()
    ops.compact_(t, range(6), 0)
    assert torch.equal(t, expected)


def test_keep_sharing_memory_with_the_tensor():
    """keep as an int64 view of the tensor it compacts is read before any slice moves (else the
    moves would overwrite it on the way: here the second row would be read at column 2, not 1)."""
    t = torch.tensor([[1, 2, 0, 3], [10, 11, 12, 13], [20, 21, 22, 23]])
    ops.compact_(t, t[0, :2], 1)
    assert t.tolist() == [[2, 0], [11, 12], [21, 22]]


@pytest.mark.parametrize("device", devices())
def test_parameter_grad_and_optimizer_state(device):
    """The Parameter object survives, so an optimizer holding it trains on, with its state compacted."""
    conv = torch.nn.Conv2d(4, 8, 3).to(device)
    opt = torch.optim.Adam(conv.parameters())
    conv(torch.randn(2, 4, 6, 6, device=device)).square().sum().backward()
    opt.step()
    keep = torch.tensor([0, 2, 3, 7])
    weight, state = conv.weight, opt.state[conv.weight]
    expected = {name: reference.compact(t, keep, 0) for name, t in state.items() if t.dim() > 0}
    expected_grad = reference.compact(weight.grad, keep, 0)
    ops.compact_parameter_(weight, keep, 0, optimizer=opt)
    assert conv.weight is weight and isinstance(weight, torch.nn.Parameter) and weight.requires_grad
    assert weight.shape == (4, 4, 3, 3) and torch.equal(weight.grad, expected_grad)
    for name, t in expected.items():
        assert torch.equal(state[name], t)
    assert state["step"].dim() == 0  # scalars stay as they are
    opt.step()  # same optimizer, compacted state: runs without a shape error


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.1, amsgrad=True),
], ids=["sgd_momentum", "adam", "adamw_amsgrad"])
def test_optimizer_goes_on_training(device, make_optimizer):
    """A step of the same optimizer after compaction equals a step of a fresh optimizer whose
    state was built from the compacted originals."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3).to(device)
    opt = make_optimizer(conv.parameters())
    x = torch.randn(2, 4, 5, 5, device=device)
    for _ in range(2):
        opt.zero_grad()
        conv(x).square().mean().backward()
        opt.step()
    keep = [0, 3, 5]
    expected_state = {name: {k: reference.compact(v, keep, 0) if v.dim() else v.clone()
                             for k, v in opt.state[p].items()}
                      for name, p in conv.named_parameters()}
    for p in conv.parameters():
        ops.compact_parameter_(p, keep, 0, optimizer=opt)
    conv.out_channels = 3

    fresh = torch.nn.Conv2d(4, 3, 3).to(device)
    fresh.load_state_dict(conv.state_dict())
    fresh_opt = make_optimizer(fresh.parameters())
    for name, p in fresh.named_parameters():
        fresh_opt.state[p] = expected_state[name]
    for model, optimizer in ((conv, opt), (fresh, fresh_opt)):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    for (name, p), q in zip(conv.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_many_batches():
    """A tensor far larger than the CUDA kernel's scratch buffer is moved in many batches."""
    t = torch.randn(1024, 512, 3, 3, device="cuda")  # 18 MiB, scratch 2.25 MiB
    keep = torch.arange(0, 1024, 3)
    expected = t[keep].clone()
    ops.compact_(t, keep, 0)
    assert torch.equal(t, expected)
    t = torch.randn(256, 2048, 3, 3, device="cuda").contiguous(memory_format=torch.channels_last)
    keep = torch.arange(1, 2048, 2)
    expected = t[:, keep].clone()
    ops.compact_(t, keep, 1)
    assert torch.equal(t, expected)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    t = torch.randn(6, 4, 3, 3, device=device)
    torch.library.opcheck(torch.ops.polyprune_ext.compact_.default, (t, torch.tensor([1, 4]), 0))


@pytest.mark.parametrize(
    "keep,dim,error,message",
    [
        ([], 0, ValueError, "keep is empty"),
        ([3, 1], 0, ValueError, r"sorted and unique; keep\[1\] = 1 follows 3"),
        ([1, 1], 0, ValueError, r"sorted and unique; keep\[1\] = 1 follows 1"),
        ([0, 5], 0, IndexError, r"keep\[1\] = 5 out of range for size 5 of dim 0"),
        ([-1], 1, IndexError, r"keep\[0\] = -1 out of range for size 4 of dim 1"),
        (torch.tensor([0.0, 1.0]), 0, TypeError, "integer indices"),
        (torch.tensor([[0, 1]]), 0, ValueError, "1-d"),
        ([0], 2, ValueError, "dim 2 out of range"),
    ],
)
def test_error_cases(keep, dim, error, message):
    t = torch.randn(5, 4)
    before = t.clone()
    with pytest.raises(error, match=message):
        ops.compact_(t, keep, dim)
    assert torch.equal(t, before)  # a refused call changes nothing


def test_non_dense_tensor_is_refused():
    t = torch.randn(6, 8)[:, ::2]
    with pytest.raises(ValueError, match="must be dense"):
        ops.compact_(t, [0, 1], 0)
