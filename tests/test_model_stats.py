"""model_stats against counts worked out by hand."""

import pytest
import torch

from polyprune_ext.structure import Dropped, drop_unused_, model_stats


class ConvWithDeadBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.dead = torch.nn.Linear(5, 4)  # built, never called

    def forward(self, x, scale=1.0):
        return self.bn(self.conv(x)) * scale


def test_hand_counted_model():
    stats = model_stats(ConvWithDeadBranch(), torch.randn(2, 3, 10, 10))
    conv, bn, dead = 8 * 3 * 9 + 8, 2 * 8, 4 * 5 + 4
    assert stats.params == conv + bn + dead
    assert stats.used_params == conv + bn
    assert stats.unused == ("dead.weight", "dead.bias")
    # 2 FLOPs per multiply-add: batch 2 x 8 output channels x 10 x 10 positions x 3 x 3 x 3 inputs
    assert stats.flops == 2 * (2 * 8 * 10 * 10) * (3 * 3 * 3)


def test_tuple_input_and_state_left_alone():
    model = ConvWithDeadBranch().train()
    running_mean = model.bn.running_mean.clone()
    stats = model_stats(model, (torch.randn(1, 3, 4, 4), 2.0))
    assert stats.flops == 2 * (8 * 4 * 4) * 27
    assert model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, running_mean)


def test_pspnet_unused_encoder_stages():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.PSPNet("resnet34", encoder_weights=None)
    stats = model_stats(model, torch.randn(1, 3, 64, 64))
    # PSPNet (depth 3) never calls resnet34's layer3 and layer4.
    expected = [n for n, _ in model.named_parameters() if n.startswith(("encoder.layer3.", "encoder.layer4."))]
    assert sorted(stats.unused) == sorted(expected)
    unused_numel = sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert stats.used_params == stats.params - unused_numel
    assert unused_numel > 19_000_000


def test_pspnet_drop_unused_stages():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = smp.PSPNet("resnet34", encoder_weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    before = model_stats(model, x)
    with torch.no_grad():
        expected = model(x)
    assert drop_unused_(model, x) == ["encoder.layer3", "encoder.layer4"]
    after = model_stats(model, x)
    assert after.unused == ()
    assert after.used_params == before.used_params == after.params
    assert not any(k.startswith(("encoder.layer3.", "encoder.layer4.")) for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert isinstance(model.encoder.layer4, Dropped) and not list(model.encoder.layer4.parameters())
    with pytest.raises(RuntimeError, match="encoder.layer4 was removed by drop_unused_"):
        model.encoder.layer4(x)
    assert drop_unused_(model, x) == []  # nothing left to drop


class SpareParameter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.spare = torch.nn.Parameter(torch.ones(3))  # never read

    def forward(self, x):
        return x * 2


class CalledButUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = SpareParameter()  # called, but none of its parameters is read
        self.dead = ConvWithDeadBranch()  # never called: dropped as a whole, not child by child

    def forward(self, x):
        return self.block(x)


def test_only_uncalled_modules_are_dropped():
    model, x = CalledButUnused(), torch.randn(2, 3)
    assert model_stats(model, x).unused == ("block.spare", "dead.conv.weight", "dead.conv.bias",
                                            "dead.bn.weight", "dead.bn.bias", "dead.dead.weight",
                                            "dead.dead.bias")
    assert drop_unused_(model, x) == ["dead"]
    assert isinstance(model.dead, Dropped) and isinstance(model.block, SpareParameter)
    assert model_stats(model, x).unused == ("block.spare",)  # reported, not dropped
    assert torch.equal(model(x), x * 2)
