"""Rules for the patterns of MONAI and timm networks, each on a small model that reproduces it,
proved by function preservation in float64 (polyprune_ext.testing.prune_and_compare) and, where
scores depend on it, by TaylorFO against masks placed by hand."""

import pytest
import torch

from polyprune_ext import PruningPlan, analyze, cost, model_stats, score, select_channels
from polyprune_ext.structure import prune_
from polyprune_ext.testing import masked_norm_reference, prune_and_compare

bn = torch.nn.BatchNorm2d


def conv_bn(cin, cout, k=1, groups=1):
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), bn(cout),
                               torch.nn.ReLU())


class GhostLike(torch.nn.Module):
    """GhostNet's module: a cheap depthwise op of the primary conv's output, concatenated with
    it; the primary conv's channels enter the cat twice."""

    def __init__(self):
        super().__init__()
        self.stem, self.primary = conv_bn(3, 8, 3), conv_bn(8, 6)
        self.cheap = conv_bn(6, 6, 3, groups=6)
        self.head = torch.nn.Conv2d(12, 2, 1)

    def forward(self, x):
        x1 = self.primary(self.stem(x))
        return self.head(torch.cat([x1, self.cheap(x1)], 1))


class RootLike(torch.nn.Module):
    """DLA's root: ``cat([block(x) + x, x])``, the same group in both inputs."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3)
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), bn(8))
        self.root = torch.nn.Conv2d(16, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.root(torch.cat([self.block(x) + x, x], 1))


@pytest.mark.parametrize("model", [GhostLike, RootLike])
def test_a_concatenation_of_tied_channels_keeps_every_gate(model):
    analysis, _, _, error = prune_and_compare(model(), torch.randn(2, 3, 8, 8), 0.4)
    assert error <= 1e-9  # was 9e-2 (GhostLike) and 2e-1 (RootLike): a gate dropped


def test_taylor_scores_a_channel_that_enters_a_concatenation_twice():
    """The first-order change when a primary channel goes: masks on it at the primary conv's
    output and at the cheap op's, placed by hand."""
    torch.manual_seed(0)
    model = GhostLike().double().eval()
    x, target = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randn(3, 2, 8, 8, dtype=torch.float64)
    loss = lambda y, t: torch.nn.functional.mse_loss(y, t, reduction="sum")  # noqa: E731
    got = score(model, [(x, target)], loss_fn=loss, grad="loss", reduce="sum_abs", progress=False)
    mask = torch.ones(3, 6, 1, 1, dtype=torch.float64, requires_grad=True)
    hooks = [m.register_forward_hook(lambda m, i, out: out * mask) for m in (model.primary, model.cheap)]
    loss(model(x), target).backward()
    for h in hooks:
        h.remove()
    (i,) = [i for i, g in enumerate(got.analysis.groups) if g.prunable and g.size == 6]
    torch.testing.assert_close(got.values[i], mask.grad.flatten(1).abs().sum(0))


class MixedLike(torch.nn.Module):
    """timm's MixedConv2d: split sizes held in ``self.splits``, a conv of its own per piece."""

    def __init__(self, splits=(4, 6)):
        super().__init__()
        self.splits = list(splits)
        self.parts = torch.nn.ModuleList(torch.nn.Conv2d(n, n, k, padding=k // 2, groups=n)
                                         for n, k in zip(splits, (3, 5)))

    def forward(self, x):
        return torch.cat([c(p) for c, p in zip(self.parts, torch.split(x, self.splits, 1))], 1)


class LiteralSplit(MixedLike):
    def __init__(self):
        super().__init__()
        del self.splits

    def forward(self, x):
        return torch.cat([c(p) for c, p in zip(self.parts, torch.split(x, [4, 6], 1))], 1)


class Mixed(torch.nn.Module):
    def __init__(self, mixed=MixedLike):
        super().__init__()
        self.stem, self.mixed, self.post = conv_bn(3, 10, 3), mixed(), conv_bn(10, 6)
        self.head = torch.nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.post(torch.relu(self.mixed(self.stem(x)))))


def test_split_sizes_held_by_a_module_follow_a_prune():
    """Bug class b: the stored sizes were left as they were, and the pruned model failed at its
    first forward. The stem's one group is cut where the split cuts it."""
    model = Mixed()
    analysis, _, _, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-9
    assert model.mixed.splits == [2, 3] == [c.out_channels for c in model.mixed.parts]
    assert not analysis.report().count("split")


def test_split_sizes_the_surgery_cannot_update_freeze():
    """Constant sizes: the trial prune on the meta device finds that removing the channels
    breaks the forward pass."""
    analysis, _, _, error = prune_and_compare(Mixed(LiteralSplit), torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-9
    assert "breaks the forward pass (RuntimeError: split_with_sizes expects" in analysis.report()
    assert not any(s.name.startswith("stem.") for g in analysis.prunable for s in g.slots)


class BlurLike(torch.nn.Module):
    """timm's BlurPool2d: a depthwise F.conv2d whose weight is a non-persistent buffer and whose
    groups are ``self.channels``."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.register_buffer("filt", torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0]))
                             .div(16).expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x):
        x = torch.nn.functional.pad(x, [1, 1, 1, 1], mode="reflect")
        return torch.nn.functional.conv2d(x, self.filt, stride=2, groups=self.channels)


class Blurred(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.blur, self.head = conv_bn(3, 8, 3), BlurLike(8), torch.nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.blur(self.stem(x)))


def test_buffers_as_weights_are_costed_and_pruned():
    """Bug class c: the cost model raised KeyError on the buffer, and the pruned model failed at
    its forward (``channels`` not updated)."""
    x = torch.randn(1, 3, 16, 16)
    model = Blurred().eval()
    analysis = analyze(model, x)
    assert cost(analysis)["flops"] == model_stats(model, x).flops  # the buffer conv counted
    assert cost(analysis)["params"] == model_stats(model, x).params  # and not as a parameter
    keep = select_channels(analysis, {i: torch.rand(g.size) for i, g in enumerate(analysis.groups)
                                      if g.prunable}, amount=0.5)
    predicted = cost(analysis, {i: len(k) for i, k in keep.items()})
    prune_(model, analysis, keep)
    assert model.blur.channels == model.blur.filt.shape[0] == model.stem[0].out_channels < 8
    assert predicted["flops"] == model_stats(model, x).flops
    analysis, _, _, error = prune_and_compare(Blurred(), x, 0.5)
    assert error <= 1e-9


class SqueezeExcite(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.reduce, self.expand = torch.nn.Conv2d(channels, 4, 1), torch.nn.Conv2d(4, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class GhostSE(GhostLike):
    """SE over a concatenation (GhostNet): the gate's one group is cut to line up with the cat."""

    def __init__(self):
        super().__init__()
        self.se = SqueezeExcite(12)

    def forward(self, x):
        x1 = self.primary(self.stem(x))
        return self.head(self.se(torch.cat([x1, self.cheap(x1)], 1)))


class GroupedSE(torch.nn.Module):
    """SE after a grouped conv (RegNetY): the gate is cut into the conv's blocks."""

    def __init__(self):
        super().__init__()
        self.stem, self.grouped = conv_bn(3, 8, 3), conv_bn(8, 12, 3, groups=4)
        self.se, self.head = SqueezeExcite(12), torch.nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.head(self.se(self.grouped(self.stem(x))))


@pytest.mark.parametrize("model", [GhostSE, GroupedSE])
def test_squeeze_excitation_over_differently_concatenated_channels(model):
    analysis, _, _, error = prune_and_compare(model(), torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-9
    assert analysis.report().count("\n") == 1  # the model's input and output alone are frozen


class Chunked(torch.nn.Module):
    """torch.chunk's pieces are computed from the input: they stay equal, tied block to block."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = conv_bn(3, 6, 3), conv_bn(3, 6, 3), torch.nn.Conv2d(6, 2, 1)

    def forward(self, x):
        left, right = torch.cat([self.a(x), self.b(x)], 1).chunk(2, dim=1)
        return self.head(left * torch.sigmoid(right))


def test_chunks_stay_equal():
    model = Chunked()
    analysis, _, _, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-9 and model.a[0].out_channels == model.b[0].out_channels == 3
    (tied,) = [g for g in analysis.groups if any(s.name == "a.0.weight" and s.dim == 0 for s in g.slots)]
    assert any(s.name == "b.0.weight" for s in tied.slots)  # one group: never pruned apart


class PReLUs(torch.nn.Module):
    """A PReLU weight per channel, and a single one (MONAI's default activation)."""

    def __init__(self):
        super().__init__()
        self.a, self.act_a = torch.nn.Conv2d(3, 8, 3), torch.nn.PReLU(8)
        self.b, self.act_b = torch.nn.Conv2d(8, 6, 3), torch.nn.PReLU()
        self.head = torch.nn.Conv2d(6, 2, 1)
        torch.nn.init.uniform_(self.act_a.weight, -1, 1)

    def forward(self, x):
        return self.head(self.act_b(self.b(self.act_a(self.a(x)))))


def test_prelu_weights_follow_their_channels():
    model = PReLUs()
    analysis, _, _, error = prune_and_compare(model, torch.randn(2, 3, 12, 12), 0.5)
    assert error <= 1e-9 and len(analysis.prunable) == 2
    assert model.act_a.weight.shape == (4,) and model.act_a.num_parameters == 4
    assert model.act_b.weight.shape == (1,)


class GroupNorms(torch.nn.Module):
    """Group norms of 4 and 2 channels per group over one conv, tied by a residual add, and one
    over a concatenation whose channel groups cut its norm groups."""

    def __init__(self):
        super().__init__()
        self.a, self.gn_a = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GroupNorm(4, 16)
        self.b, self.gn_b = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.GroupNorm(8, 16)
        self.c, self.d = torch.nn.Conv2d(16, 6, 1), torch.nn.Conv2d(16, 6, 1)
        self.gn_cut = torch.nn.GroupNorm(3, 12)  # groups of 4: c's 6 channels end inside one
        self.head = torch.nn.Conv2d(12, 2, 1)
        for gn in (self.gn_a, self.gn_b, self.gn_cut):
            torch.nn.init.uniform_(gn.weight, 0.5, 1.5)
            torch.nn.init.uniform_(gn.bias, -0.5, 0.5)

    def forward(self, x):
        x = torch.relu(self.gn_a(self.a(x)))
        x = torch.relu(x + self.gn_b(self.b(x)))
        return self.head(self.gn_cut(torch.cat([self.c(x), self.d(x)], 1)))


def test_group_norms_prune_whole_groups():
    model = GroupNorms()
    analysis, _, _, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-9
    (residual,) = [g for g in analysis.prunable if g.size == 16]
    assert residual.unit == 4  # runs of 4 fit both norms' groups
    assert (model.gn_a.num_groups, model.gn_a.num_channels, model.gn_b.num_groups) == (2, 8, 4)
    assert "group norm of 4 channels per group, whose groups cut channel groups" in analysis.report()
    assert model.c.out_channels == model.d.out_channels == 6


def test_runs_are_selected_whole_with_round_to():
    analysis = analyze(GroupNorms().eval(), torch.randn(1, 3, 8, 8))
    i = next(i for i, g in enumerate(analysis.groups) if g.prunable and g.size == 16)
    scores = torch.arange(16.0).flip(0)  # run means 13.5, 9.5, 5.5, 1.5
    scores[12] = 20.0  # the best channel, but its run's mean is 5.75: runs 0 and 1 stay
    keep = select_channels(analysis, {i: scores}, amount=0.4, target="channels")
    assert keep[i].tolist() == list(range(8))
    keep = select_channels(analysis, {i: scores}, amount=0.2, target="channels", round_to=8)
    assert keep[i].tolist() == list(range(8))  # 12 kept is no multiple of lcm(4, 8): 2 runs go
    model = GroupNorms().eval()
    with pytest.raises(ValueError, match="runs of 4 channels"):
        prune_(model, analysis, {i: torch.arange(6)})


class GRN(torch.nn.Module):
    """timm's GlobalResponseNorm (ConvNeXt-V2) on channels-last tokens."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.bias = torch.nn.Parameter(torch.rand(dim) - 0.5)

    def forward(self, x):
        x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
        x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), x * x_n)


class MixingNorms(torch.nn.Module):
    """A ConvNeXt-V2 block (layer norm over channels on channels-last tokens, GRN) on a residual
    stream, a group norm whose groups cut channel groups and a group norm of one group."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.ln, self.fc1 = torch.nn.LayerNorm(16), torch.nn.Linear(16, 24)
        self.grn, self.fc2 = GRN(24), torch.nn.Linear(24, 16)
        self.c, self.d = torch.nn.Conv2d(16, 6, 1), torch.nn.Conv2d(16, 6, 1)
        self.e = torch.nn.Conv2d(16, 12, 1)
        self.gn_cut, self.gn_one = torch.nn.GroupNorm(3, 12), torch.nn.GroupNorm(1, 12)
        self.head = torch.nn.Conv2d(24, 2, 1)
        for norm in (self.ln, self.gn_cut, self.gn_one):
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
            torch.nn.init.uniform_(norm.bias, -0.5, 0.5)

    def forward(self, x):
        x = self.stem(x)
        t = self.fc2(self.grn(torch.nn.functional.gelu(self.fc1(self.ln(x.permute(0, 2, 3, 1))))))
        x = x + t.permute(0, 3, 1, 2)
        y = torch.relu(self.gn_cut(torch.cat([self.c(x), self.d(x)], 1)))
        return self.head(torch.cat([y, self.gn_one(self.e(x))], 1))


def test_mixing_norms_freeze_by_default():
    analysis = analyze(MixingNorms(), torch.randn(1, 3, 8, 8))
    assert not analysis.prunable
    report = analysis.report()
    for reason in ("layer norm normalizes across channels: removing one would change the others in ln",
                   "a mean over channels: removing one would change the others in grn",
                   "group norm of 4 channels per group, whose groups cut channel groups: removing one",
                   "group norm of 12 channels per group: removing one would change the others in gn_one"):
        assert reason in report


def test_pruning_through_mixing_norms_equals_masked_norms():
    """The pruned model equals one whose removed channels are zeroed at their gates and left out
    of every mixing norm's statistics (testing.masked_norm_reference)."""
    torch.manual_seed(0)
    model = MixingNorms().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    analysis = analyze(model, x, mixing_norms="prune")
    assert {m for g in analysis.prunable for m in g.mixing} == {"ln", "grn", "gn_cut", "gn_one"}
    assert analysis.report().count("pruned through channel-mixing norms") == len(analysis.prunable) == 5
    gen = torch.Generator().manual_seed(0)
    keep = {i: torch.randperm(g.size, generator=gen)[: g.size // 2].sort().values
            for i, g in enumerate(analysis.groups) if g.prunable}
    reference = masked_norm_reference(model, analysis, keep)
    plan = PruningPlan(list(x.shape))
    plan.prune_(model, analysis, keep)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-6
    assert model.ln.normalized_shape == (8,) and model.gn_cut.num_groups == 3
    assert model.gn_cut.num_channels == model.gn_one.num_channels == model.c.out_channels * 2
    replayed = plan.replay_(MixingNorms()).double()  # the plan prunes through the norms again
    replayed.load_state_dict(model.state_dict())
    torch.testing.assert_close(replayed(x), got)


class Attention(torch.nn.Module):
    """Multi-head self-attention on channels-last tokens, heads split and joined by views (timm's
    Attention: ``self.head_dim`` in the reshape). ``from_input``: the head size computed from
    the input's channels instead (MONAI's window attention), wrong once qkv is pruned."""

    def __init__(self, dim=12, heads=3, from_input=False):
        super().__init__()
        self.heads, self.head_dim, self.from_input = heads, dim // heads, from_input
        self.scale = self.head_dim ** -0.5
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        head_dim = c // self.heads if self.from_input else self.head_dim
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Tokens2d(torch.nn.Module):
    """Attention over the tokens of a feature map whose channels a layer norm freezes."""

    def __init__(self, from_input=False):
        super().__init__()
        self.stem, self.norm = torch.nn.Conv2d(3, 12, 2, stride=2), torch.nn.LayerNorm(12)
        self.attn, self.mid, self.head = Attention(from_input=from_input), conv_bn(12, 8), torch.nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        t = self.attn(self.norm(x.flatten(2).transpose(1, 2)))
        return self.head(self.mid(x + t.transpose(1, 2).reshape(b, c, h, w)))


def test_attention_heads_split_and_joined_by_views():
    """The same channels of every head go (q, k and v alike), ``head_dim`` follows."""
    model = Tokens2d()
    analysis, _, _, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-9
    assert model.attn.head_dim == 2 and model.attn.qkv.out_features == 3 * 3 * 2
    assert model.attn.scale == 4 ** -0.5  # the function's, not the new head size's


def test_a_count_the_analysis_cannot_see_freezes_by_a_trial_prune():
    """A head size computed from another tensor's channels (frozen by the layer norm): pruning
    the heads would break the forward pass, which the trial prune on the meta device finds."""
    model = Tokens2d(from_input=True)
    analysis, _, _, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-9
    assert "removing its channels breaks the forward pass (RuntimeError: shape" in analysis.report()
    assert model.attn.qkv.out_features == 36 and model.mid[0].out_channels == 4  # the rest goes


class SelectiveKernelAttn(torch.nn.Module):
    def __init__(self, channels, paths):
        super().__init__()
        self.num_paths = paths
        self.reduce, self.select = torch.nn.Conv2d(channels, 4, 1), torch.nn.Conv2d(4, channels * paths, 1)

    def forward(self, x):
        attn = self.select(torch.relu(self.reduce(x.sum(1).mean((2, 3), keepdim=True))))
        b, c, h, w = attn.shape
        return attn.view(b, self.num_paths, c // self.num_paths, h, w).softmax(1)


class SelectiveKernel(torch.nn.Module):
    """timm's SelectiveKernel: the input split over paths (``self.in_channels //
    self.num_paths``), the paths stacked, attention over the paths by a view."""

    def __init__(self, channels=8, paths=2):
        super().__init__()
        self.in_channels, self.num_paths = channels, paths
        self.paths = torch.nn.ModuleList(conv_bn(channels // paths, channels, 3) for _ in range(paths))
        self.attn = SelectiveKernelAttn(channels, paths)

    def forward(self, x):
        pieces = torch.split(x, self.in_channels // self.num_paths, 1)
        x = torch.stack([path(p) for path, p in zip(self.paths, pieces)], 1)
        return (x * self.attn(x)).sum(1)


class SKNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.sk, self.head = conv_bn(3, 8, 3), SelectiveKernel(), torch.nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.sk(self.stem(x)))


def test_selective_kernel_paths():
    model = SKNet()
    analysis, _, _, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-9
    assert analysis.report().count("\n") == 1
    assert model.sk.in_channels == model.stem[0].out_channels == 4
    assert model.sk.attn.select.out_channels == 2 * model.sk.paths[0][0].out_channels


class Multiplier(torch.nn.Module):
    """A depthwise conv with two outputs per input channel (FastViT's patch embedding)."""

    def __init__(self):
        super().__init__()
        self.stem, self.dw = conv_bn(3, 8, 3), conv_bn(8, 16, 3, groups=8)
        self.head = torch.nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(self.dw(self.stem(x)))


def test_depthwise_conv_with_several_outputs_per_input():
    """Removing an input channel would take its outputs with it; what is exact: the same output
    of every input channel goes, and the input channels stay."""
    model = Multiplier()
    analysis, _, _, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-9
    assert (model.dw[0].in_channels, model.dw[0].out_channels, model.dw[0].groups) == (8, 8, 8)
    assert model.stem[0].out_channels == 8


class GroupedTransposed(torch.nn.Module):
    """A grouped transposed conv: its weight holds every input channel and one block's outputs."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3)
        self.up = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 12, 2, stride=2, groups=4), bn(12))
        self.head = torch.nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(self.stem(x))))


def test_grouped_transposed_convolution():
    model = GroupedTransposed()
    analysis, _, _, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-9
    up = model.up[0]
    assert (up.in_channels, up.out_channels, up.groups, up.weight.shape[:2]) == (4, 8, 4, (4, 2))
