"""Channel-group analysis and physical pruning, proved by function preservation.

In a float64 copy of the model, the channels to be removed are zeroed at every gate of their
group, so they contribute nothing; the physically pruned model must then give the same output.
"""

import copy

import pytest
import torch

from polyprune_ext.dependency import analyze
from polyprune_ext.model_stats import model_stats
from polyprune_ext.surgery import prune_, zero_channels


def randomize_norms(model):
    """Batch norms that are not identities and layer scales that are not ~0 (timm's ConvNeXt starts
    them at 1e-6), so that a zeroed channel visibly changes the output."""
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("gamma") and p.dim() == 1:
            p.data.copy_(torch.rand(p.numel(), generator=gen) + 0.5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


def zeroed_reference(model, analysis, keep):
    """A copy of model whose removed channels are zeroed at each of their group's gates."""
    reference = copy.deepcopy(model)
    drop = {i: sorted(set(range(analysis.groups[i].size)) - set(torch.as_tensor(k).tolist()))
            for i, k in keep.items()}
    zero_channels(reference, analysis, drop)
    return reference


def prune_and_compare(model, x, ratio, seed=0):
    """Prune `ratio` of every prunable group at random; return (analysis, before, after, error)."""
    model, x = model.double().eval(), x.double()
    randomize_norms(model)
    analysis = analyze(model, x)
    gen = torch.Generator().manual_seed(seed)
    keep = {i: torch.randperm(g.size, generator=gen)[: max(1, round(g.size * (1 - ratio)))].sort().values
            for i, g in enumerate(analysis.groups) if g.prunable}
    reference = zeroed_reference(model, analysis, keep)
    before = model_stats(model, x)
    with torch.no_grad():
        expected, original = reference(x), model(x)
    change = ((expected - original).abs().max() / original.abs().max()).item()
    assert change > 1e-4, f"zeroing changed the output by only {change:.1e}: the check would be empty"
    prune_(model, analysis, keep)
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    return analysis, before, model_stats(model, x), error


class Toy(torch.nn.Module):
    """Residual add, U-Net style concatenation, depthwise conv, squeeze-excitation gate."""

    def __init__(self):
        super().__init__()
        bn = torch.nn.BatchNorm2d
        self.stem, self.stem_bn = torch.nn.Conv2d(3, 8, 3, padding=1), bn(8)
        self.res, self.res_bn = torch.nn.Conv2d(8, 8, 3, padding=1), bn(8)
        self.dw, self.dw_bn = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), bn(8)
        self.squeeze, self.excite = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 8, 1)
        self.down = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.fuse, self.fuse_bn = torch.nn.Conv2d(8 + 6, 10, 3, padding=1), bn(10)
        self.head = torch.nn.Conv2d(10, 2, 1)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(x + self.res_bn(self.res(x)))
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = x * torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        skip = x
        x = self.up(torch.relu(self.down(x)))
        x = torch.relu(self.fuse_bn(self.fuse(torch.cat([skip, x], 1))))
        return self.head(x)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_toy_model_function_preserved(ratio):
    analysis, before, after, error = prune_and_compare(Toy(), torch.randn(2, 3, 16, 16), ratio)
    assert error <= 1e-6
    assert len(analysis.prunable) == 5  # stem+res+dw+excite tied, squeeze, down, up, fuse
    assert after.params < before.params and after.flops < before.flops


def test_module_attributes_follow():
    model = Toy().double()
    analysis = analyze(model, torch.randn(1, 3, 8, 8).double())
    keep = {i: torch.arange(g.size // 2) for i, g in enumerate(analysis.groups) if g.prunable}
    prune_(model, analysis, keep)
    assert (model.stem.out_channels, model.dw.groups, model.dw.in_channels) == (4, 4, 4)
    assert (model.up.in_channels, model.up.out_channels, model.fuse.in_channels) == (6, 3, 7)
    assert model.fuse_bn.num_features == model.fuse.out_channels == 5
    again = analyze(model, torch.randn(1, 3, 8, 8).double())  # a new analysis sees the new sizes
    assert sorted(g.size for g in again.prunable) == sorted(g.size // 2 for g in analysis.prunable)


class WithUnknownOp(Toy):
    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x))).flip(1)  # an op the analysis has no rule for
        return self.head(torch.relu(self.fuse_bn(self.fuse(torch.cat([x, x[:, :6]], 1)))))


def test_unknown_op_is_reported_and_frozen():
    analysis, _, _, error = prune_and_compare(WithUnknownOp(), torch.randn(1, 3, 8, 8), 0.5)
    assert error <= 1e-6
    report = analysis.report()
    assert "flip" in report and "stem" in report
    assert all("stem_bn" != m.module for g in analysis.prunable for m in g.gates)


class WithUntracedPerChannelOps(Toy):
    def __init__(self):
        super().__init__()
        self.scale = torch.rand(8, 1, 1, dtype=torch.float64) + 0.5  # neither parameter nor buffer

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x))) * self.scale  # per channel, untraced
        x = torch.nn.functional.pad(self.res(x), (0, 0, 0, 0, 0, 6))  # pads the channel dim
        return self.head(torch.relu(self.fuse_bn(self.fuse(x))))


def test_untraced_per_channel_operands_freeze():
    analysis, _, _, error = prune_and_compare(WithUntracedPerChannelOps(), torch.randn(1, 3, 8, 8), 0.5)
    assert error <= 1e-6
    report = analysis.report()
    assert "per-channel operand" in report and "constant_pad_nd" in report
    prunable_gates = {gate.module for g in analysis.prunable for gate in g.gates}
    assert prunable_gates == {"fuse_bn"}  # fuse's own output is read only by fuse_bn


def test_frozen_group_cannot_be_pruned():
    model = Toy().double()
    analysis = analyze(model, torch.randn(1, 3, 8, 8).double())
    frozen = next(i for i, g in enumerate(analysis.groups) if not g.prunable)
    with pytest.raises(ValueError, match="cannot be pruned"):
        prune_(model, analysis, {frozen: [0]})


ARCHITECTURES = ["Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "Linknet",
                 "MAnet", "PAN", "UPerNet", "Segformer"]
ENCODERS = ["resnet18", "resnext50_32x4d", "se_resnet50", "efficientnet-b0", "mobilenet_v2",
            "densenet121", "vgg11_bn", "timm-regnetx_002", "mit_b0", "tu-convnext_atto"]


def build_smp(arch, encoder):
    """The model, or a skip where smp itself cannot build the pair (mit with some decoders)."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    try:
        return getattr(smp, arch)(encoder, encoder_weights=None)
    except Exception as error:  # smp refuses the combination at construction
        pytest.skip(f"smp cannot build {arch} with {encoder}: {error}")


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_smp_function_preserved(arch, encoder, ratio):
    model = build_smp(arch, encoder)
    size = 128 if arch == "PAN" else 64  # PAN's pyramid pooling needs 128
    analysis, before, after, error = prune_and_compare(model, torch.randn(1, 3, size, size), ratio)
    assert error <= 1e-6
    assert analysis.prunable and after.flops < before.flops and after.params < before.params


def test_optimizer_state_follows_the_parameters():
    """prune_ compacts AdamW's state exactly as it compacts each parameter, and the same
    optimizer then goes on training. Marker: every state tensor starts equal to its parameter
    (squared for exp_avg_sq), so afterwards it must equal the pruned parameter."""
    torch.manual_seed(0)
    model = Toy()
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    torch.nn.functional.mse_loss(model(x), target).backward()
    opt.step()
    for p in model.parameters():
        opt.state[p]["exp_avg"].copy_(p.detach())
        opt.state[p]["exp_avg_sq"].copy_(p.detach().square())
    analysis = analyze(model, x)
    keep = {i: torch.arange(0, g.size, 2) for i, g in enumerate(analysis.groups) if g.prunable}
    prune_(model, analysis, keep, optimizer=opt)
    for p in model.parameters():
        assert torch.equal(opt.state[p]["exp_avg"], p.detach())
        assert torch.equal(opt.state[p]["exp_avg_sq"], p.detach().square())
        assert p.grad.shape == p.shape
    # The same optimizer trains on: its step equals that of a fresh AdamW on a copy of the pruned
    # model, given the compacted state built anew from the pruned parameters (the marker).
    fresh_model = copy.deepcopy(model)
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=0.01)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        fresh.state[q] = {"step": opt.state[p]["step"].clone(), "exp_avg": q.detach().clone(),
                          "exp_avg_sq": q.detach().square()}
    for m, o in ((model, opt), (fresh_model, fresh)):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), target).backward()
        o.step()
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)


class Grouped(torch.nn.Module):
    """ResNeXt-style grouped convs: one reading a concatenation of two groups that spans its conv
    groups whole, one whose conv groups would cut a group (frozen)."""

    def __init__(self):
        super().__init__()
        bn = torch.nn.BatchNorm2d
        self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(3, 4, 1)
        self.grouped, self.grouped_bn = torch.nn.Conv2d(12, 6, 3, padding=1, groups=3), bn(6)
        self.expand, self.expand_bn = torch.nn.Conv2d(6, 10, 1), bn(10)
        self.c, self.d = torch.nn.Conv2d(3, 5, 1), torch.nn.Conv2d(3, 7, 1)
        self.cut = torch.nn.Conv2d(12, 4, 1, groups=2)  # 6 channels per conv group: c's 5 cut
        self.head = torch.nn.Conv2d(14, 2, 1)

    def forward(self, x):
        ab = torch.relu(torch.cat([self.a(x), self.b(x)], 1))  # conv groups: a, a, b
        y = torch.relu(self.grouped_bn(self.grouped(ab)))
        y = torch.relu(self.expand_bn(self.expand(y)))
        cd = torch.relu(torch.cat([self.c(x), self.d(x)], 1))
        return self.head(torch.cat([y, self.cut(cd)], 1))


def test_grouped_convolutions_prune_the_same_local_channel_from_every_conv_group():
    model = Grouped()
    analysis, _, _, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-6
    assert model.grouped.groups == 3 and model.grouped.weight.shape == (3, 2, 3, 3)
    assert (model.grouped.in_channels, model.grouped.out_channels) == (6, 3)
    assert "grouped convolution (2 groups)" in analysis.report()
    assert model.a.out_channels == 4 and model.b.out_channels == 2  # tied block to block
    assert model.c.out_channels == 5 and model.d.out_channels == 7


class Tokens(torch.nn.Module):
    """Linear layers on channels-last tokens, a layer scale, per-channel group and instance
    norms, a group norm that mixes channels, and chunks that map back to concatenated groups."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.inorm = torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.a, self.b = torch.nn.Conv2d(8, 6, 1), torch.nn.Conv2d(8, 4, 1)
        self.gn_per_channel = torch.nn.GroupNorm(10, 10)
        self.fc1, self.fc2 = torch.nn.Linear(10, 16), torch.nn.Linear(16, 10)
        self.proj = torch.nn.Conv2d(10, 10, 1)
        self.scale = torch.nn.Parameter(torch.rand(10) + 0.5)
        self.mixing = torch.nn.Conv2d(10, 12, 1)
        self.gn_mixing = torch.nn.GroupNorm(3, 12)
        self.head = torch.nn.Conv2d(12 + 10, 2, 1)

    def forward(self, x):
        x = torch.relu(self.inorm(self.stem(x)))
        x = self.gn_per_channel(torch.cat([self.a(x), self.b(x)], 1))
        a, b = x.split([self.a.out_channels, self.b.out_channels], 1)  # the two groups again
        x = torch.cat([torch.relu(a), b], 1)
        tokens = self.proj(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        tokens = tokens + self.fc2(torch.nn.functional.gelu(self.fc1(tokens))) * self.scale
        x = tokens.permute(0, 3, 1, 2)
        return self.head(torch.cat([self.gn_mixing(self.mixing(x)), x], 1))


def test_linear_norms_and_splits_function_preserved():
    model = Tokens()
    model.inorm.running_mean.uniform_(-1, 1)
    model.inorm.running_var.uniform_(0.5, 1.5)
    analysis, before, after, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-6
    prunable = {gate.module for g in analysis.prunable for gate in g.gates}
    assert {"inorm", "fc1", "fc2"} <= prunable  # the MLP channels, on tokens
    assert not any(gate.module == "gn_mixing" for g in analysis.prunable for gate in g.gates)
    assert "group norm of 4 channels per group" in analysis.report()
    assert model.fc1.out_features == 8 and model.fc2.in_features == 8
    assert model.inorm.num_features == 4 and model.scale.shape == (5,)


def test_ignored_modules_keep_their_output_channels():
    model = Toy().double()
    x = torch.randn(1, 3, 8, 8).double()
    everything = analyze(model, x, ignore=())
    ignoring = analyze(model, x, ignore=("fuse_bn", "down"))
    assert len(ignoring.prunable) == len(everything.prunable) - 2
    assert "ignored module" in ignoring.report()
    with pytest.raises(ValueError, match="no_such_layer"):
        analyze(model, x, ignore=("no_such_layer",))
