"""Channel-group analysis and physical pruning, proved by function preservation.

In a float64 copy of the model, the channels to be removed are zeroed at every gate of their
group, so they contribute nothing; the physically pruned model must then give the same output.
"""

import copy

import pytest
import torch

import polyprune_ext
from polyprune_ext import analyze
from polyprune_ext.structure import prune_
from polyprune_ext.testing import (SMP_ARCHITECTURES, SMP_ENCODERS, ZOO, Grouped, Tokens, Toy,
                                   build_smp, conv_share, prune_and_compare)


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


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("encoder", SMP_ENCODERS)
@pytest.mark.parametrize("arch", SMP_ARCHITECTURES)
def test_smp_function_preserved(arch, encoder, ratio):
    model = build_smp(arch, encoder)
    size = 128 if arch == "PAN" else 64  # PAN's pyramid pooling needs 128
    analysis, before, after, error = prune_and_compare(model, torch.randn(1, 3, size, size), ratio)
    assert error <= 1e-6
    assert analysis.prunable and after.flops < before.flops and after.params < before.params


# The least share of conv output channels prunable (in groups that can lose some) per model of
# testing.ZOO, as measured; ConvNeXt-V2 through its layer norms and GRN (mixing_norms="prune").
# Below 90%: SwinUNETR (its transformer's stage outputs leave in a list after a functional layer
# norm, where no module output can observe them), FastViT (a depthwise conv with two outputs per
# input channel ties the channels feeding it), EfficientViT (linear attention: a product with
# channels on both sides, and a padding of the channels).
ZOO_SHARES = {"monai.UNet": 0.99, "monai.SegResNet": 0.99, "monai.BasicUNet": 0.99,
              "monai.DynUNet": 0.99, "monai.AttentionUnet": 0.99, "monai.SwinUNETR": 0.78,
              "monai.UNet-3d": 0.99, "monai.DynUNet-3d": 0.99, "monai.SegResNet-3d": 0.99,
              "Unet-tu-convnextv2_atto": 0.99, "Unet-timm-skresnet18": 0.99, "Unet-tu-fastvit_t8": 0.66,
              "Unet-tu-regnety_002": 0.99, "Unet-tu-ghostnet_100": 0.99, "Unet-tu-dla34": 0.99,
              "Unet-tu-mixnet_s": 0.99, "Unet-tu-resnetblur18": 0.99, "Unet-tu-efficientvit_b0": 0.65}


@pytest.mark.parametrize("name", [name if name in ("monai.UNet", "monai.SegResNet") else
                                  pytest.param(name, marks=pytest.mark.slow) for name in ZOO])
def test_monai_and_timm_function_preserved(name):
    build, shape, mixing_norms = ZOO[name]
    torch.manual_seed(0)
    model = build()
    analysis, before, after, error = prune_and_compare(model, torch.randn(shape), 0.4,
                                                       mixing_norms=mixing_norms)
    assert error <= 1e-6
    assert conv_share(model, analysis) >= ZOO_SHARES[name]
    assert after.flops < before.flops


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


def test_grouped_convolutions_prune_the_same_local_channel_from_every_conv_group():
    model = Grouped()
    analysis, _, _, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-6
    assert model.grouped.groups == 3 and model.grouped.weight.shape == (3, 2, 3, 3)
    assert (model.grouped.in_channels, model.grouped.out_channels) == (6, 3)
    assert model.a.out_channels == 4 and model.b.out_channels == 2  # tied block to block
    # cut's conv groups hold c[0:5] + d[0:1] and d[1:7]: d is cut to line up, c[k] tied to
    # d[1 + k] and d[0] to d[6], so both conv groups keep as many channels
    assert (model.c.out_channels, model.d.out_channels) == (2, 4) and model.cut.in_channels == 6


def test_linear_norms_and_splits_function_preserved():
    model = Tokens()
    model.inorm.running_mean.uniform_(-1, 1)
    model.inorm.running_var.uniform_(0.5, 1.5)
    analysis, before, after, error = prune_and_compare(model, torch.randn(2, 3, 8, 8), 0.5)
    assert error <= 1e-6
    prunable = {gate.module for g in analysis.prunable for gate in g.gates}
    assert {"inorm", "fc1", "fc2", "gn_mixing"} <= prunable  # the MLP channels, on tokens
    assert model.fc1.out_features == 8 and model.fc2.in_features == 8
    assert model.inorm.num_features == 4 and model.scale.shape == (5,)
    assert model.sizes == [model.a.out_channels, model.b.out_channels] == [3, 2]
    # gn_mixing's 3 groups of 4 channels go whole: 2 groups are left (round(3 * 0.5))
    assert (model.gn_mixing.num_groups, model.gn_mixing.num_channels, model.mixing.out_channels) == (2, 8, 8)


def test_ignored_modules_keep_their_output_channels():
    model = Toy().double()
    x = torch.randn(1, 3, 8, 8).double()
    everything = analyze(model, x, ignore=())
    ignoring = analyze(model, x, ignore=("fuse_bn", "down"))
    assert len(ignoring.prunable) == len(everything.prunable) - 2
    assert "ignored module" in ignoring.report()
    with pytest.raises(ValueError, match="no_such_layer"):
        analyze(model, x, ignore=("no_such_layer",))


class ChannelGate(torch.nn.Module):
    """A layer whose per-channel tensor the tracer cannot follow: sigmoid(logits) is not one of
    the model's tensors."""

    def __init__(self, channels):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return x * torch.sigmoid(self.logits)[None, :, None, None]


def channel_gate_rule(t, call):
    space = t.channels(call["x"])
    if space is None or space.dim != 1:
        return False
    t.add_slots(space, t.name_of(call.func.logits), 0)
    t.read(call["x"], per_channel=True)
    t.propose(call.out, space)


def test_a_rule_for_a_module_class_sees_its_calls_whole():
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), ChannelGate(8), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 6, 3), ChannelGate(6), torch.nn.Conv2d(6, 2, 1))
    x = torch.randn(2, 3, 12, 12)
    assert not analyze(net(), x).prunable  # without the rule: frozen, never guessed
    rules = {ChannelGate: channel_gate_rule}
    analysis = analyze(net(), x, rules=rules)
    assert [g.size for g in analysis.prunable] == [8, 6]
    assert {gate.module for g in analysis.prunable for gate in g.gates} == {"1", "4"}  # the gates
    # function preserved: the same check as prune_and_compare, with the rule
    model = net().double()
    analysis = analyze(model, x.double(), rules=rules)
    keep = {i: torch.arange(0, g.size, 2) for i, g in enumerate(analysis.groups) if g.prunable}
    reference = copy.deepcopy(model)
    drop = {i: sorted(set(range(analysis.groups[i].size)) - set(k.tolist())) for i, k in keep.items()}
    polyprune_ext.zero_channels(reference, analysis, drop)
    prune_(model, analysis, keep)
    with torch.no_grad():
        expected, got = reference(x.double()), model(x.double())
    assert model[1].logits.shape == (4,) and model[4].logits.shape == (3,)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-12
    # registered for every analysis
    polyprune_ext.rule(ChannelGate)(channel_gate_rule)
    try:
        assert len(analyze(net(), x).prunable) == 2
    finally:
        from polyprune_ext.structure.rules import RULES
        del RULES[ChannelGate]
