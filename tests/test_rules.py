"""Rules for the patterns of MONAI and timm networks, each on a small model that reproduces it,
proved by function preservation in float64 (polyprune_ext.testing.prune_and_compare) and, where
scores depend on it, by TaylorFO against masks placed by hand."""

import pytest
import torch

from polyprune_ext import score
from polyprune_ext.testing import prune_and_compare

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
