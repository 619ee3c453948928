"""Channel selection: targets met, costs predicted exactly, limits kept, bad input refused."""

import copy
import math

import pytest
import torch

from polyprune_ext import analyze, cost, model_stats, select_channels
from polyprune_ext.structure import prune_
from polyprune_ext.testing import Grouped, Tokens, Toy


def random_scores(analysis, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {i: torch.rand(g.size, generator=gen) for i, g in enumerate(analysis.groups) if g.prunable}


def models():
    yield "toy", Toy().eval(), torch.randn(2, 3, 16, 16)
    yield "tokens (linear layers)", Tokens().eval(), torch.randn(2, 3, 8, 8)
    yield "grouped convs", Grouped().eval(), torch.randn(2, 3, 8, 8)
    smp = pytest.importorskip("segmentation_models_pytorch")
    yield "unet-resnet18", smp.Unet("resnet18", encoder_weights=None).eval(), torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("target", ["flops", "params", "channels"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_target_met_and_cost_exact(target, scope):
    for name, model, x in models():
        model = copy.deepcopy(model)
        analysis = analyze(model, x)
        full = cost(analysis)
        before = model_stats(model, x)
        assert (full["params"], full["flops"]) == (before.params, before.flops), name
        keep = select_channels(analysis, random_scores(analysis), amount=0.5, target=target, scope=scope)
        predicted = cost(analysis, {i: len(k) for i, k in keep.items()})
        prune_(model, analysis, keep)
        after = model_stats(model, x)
        assert (predicted["params"], predicted["flops"]) == (after.params, after.flops), name
        assert predicted[target] <= 0.5 * full[target], name


@pytest.mark.parametrize("target", ["flops", "params", "channels"])
def test_budget_is_met(target):
    model, x = Toy().eval(), torch.randn(2, 3, 16, 16)
    analysis = analyze(model, x)
    budget = 0.6 * cost(analysis)[target]
    keep = select_channels(analysis, random_scores(analysis), at_most=budget, target=target)
    assert cost(analysis, {i: len(k) for i, k in keep.items()})[target] <= budget
    same = select_channels(analysis, random_scores(analysis), amount=0.4, target=target)
    assert {i: k.tolist() for i, k in keep.items()} == {i: k.tolist() for i, k in same.items()}


def test_global_ranking_takes_the_lowest_scores_first():
    analysis = analyze(Toy().eval(), torch.randn(1, 3, 8, 8))
    scores = random_scores(analysis)
    low, high = sorted(scores)[:2]
    scores[high] = scores[high] + 100  # every channel of this group outranks all others
    keep = select_channels(analysis, scores, amount=0.2, target="channels")
    assert high not in keep and low in keep


def test_limits_and_rounding():
    analysis = analyze(Toy().eval(), torch.randn(1, 3, 8, 8))
    with pytest.warns(UserWarning, match="limits allow removing only"):
        keep = select_channels(analysis, random_scores(analysis), amount=0.95, target="channels",
                               min_channels=3, max_ratio=0.5, round_to=2)
    for i, k in keep.items():
        size = analysis.groups[i].size
        assert len(k) >= 3 and len(k) >= size / 2 and (len(k) % 2 == 0 or len(k) == size)
        assert torch.equal(k, k.unique())  # sorted and unique


@pytest.mark.filterwarnings("ignore:the limits allow")
def test_max_ratio_bounds_all_steps_together():
    model = Toy().eval()
    x = torch.randn(1, 3, 8, 8)
    analysis = analyze(model, x)
    original = [g.size for g in analysis.groups]
    for _ in range(3):  # each step alone could take half of what the last one left
        keep = select_channels(analysis, random_scores(analysis), amount=0.9, target="channels",
                               max_ratio=0.5, original_sizes=original)
        prune_(model, analysis, keep)
        analysis = analyze(model, x)
    for group, size in zip(analysis.groups, original):
        assert group.size >= math.ceil(size * 0.5)
    with pytest.raises(ValueError, match="original_sizes has 1 groups"):
        select_channels(analysis, random_scores(analysis), amount=0.1, original_sizes=[8])


def test_bad_input():
    analysis = analyze(Toy().eval(), torch.randn(1, 3, 8, 8))
    scores = random_scores(analysis)
    frozen = next(i for i, g in enumerate(analysis.groups) if not g.prunable)
    some = next(iter(scores))
    cases = [
        (dict(scores={frozen: torch.rand(analysis.groups[frozen].size)}), "cannot be pruned"),
        (dict(scores={some: torch.rand(analysis.groups[some].size + 1)}), "values for a group"),
        (dict(scores=scores, target="speed"), "target must be one of"),
        (dict(scores=scores, target="latency"), "needs a latency model"),
        (dict(scores=scores, scope="module"), "scope must be"),
        (dict(scores=scores, amount=1.0), "fraction to remove"),
        (dict(scores=scores, amount=0.5, at_most=10), "either amount"),
        (dict(scores=scores, amount=None, at_most=0), "at_most is the flops to keep"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("amount", 0.5)
        with pytest.raises(ValueError, match=message):
            select_channels(analysis, **kwargs)
