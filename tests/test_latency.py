"""The latency model: lookup tables interpolated as a hand computation says, the cache that makes
a second build measure nothing, round_to chosen from timings, and the latency target of
select_channels (score per millisecond saved). Times themselves are never asserted."""

import pytest
import torch

from polyprune_ext import analyze, cost, latency_model, select_channels
from polyprune_ext.structure import latency
from polyprune_ext.structure.latency import _interpolate, pick_round_to
from polyprune_ext.testing import Toy


def test_interpolation_is_bilinear_inside_and_linear_outside():
    table = {"out": [4, 8], "in": [2, 6], "ms": [[1.0, 3.0], [5.0, 11.0]]}
    assert _interpolate(table, 4, 2) == 1.0 and _interpolate(table, 8, 6) == 11.0
    assert _interpolate(table, 6, 4) == pytest.approx((1 + 3 + 5 + 11) / 4)
    assert _interpolate(table, 8, 4) == pytest.approx(8.0)
    assert _interpolate(table, 12, 2) == pytest.approx(9.0)  # extrapolated along out
    row = {"out": [1, 2, 4], "in": [1], "ms": [[1.0], [2.0], [6.0]]}  # a depthwise conv's table
    assert _interpolate(row, 3, 1) == pytest.approx(4.0)


def test_round_to_follows_the_blocks_the_timings_show():
    blocks_of_8 = {w: float(-(-w // 8)) for w in range(48, 65)}  # time steps every 8 channels
    assert pick_round_to(blocks_of_8) == 8
    assert pick_round_to({w: float(w) for w in range(48, 65)}) == 1  # every channel costs
    assert pick_round_to({w: 1.0 for w in range(48, 65)}) == 16


def test_the_fit_splits_timings_into_conv_scale_and_activations(toy_model, monkeypatch):
    """Whole-model times made as 1.25 x the convs' table time + 2e-6 ms per activation are fitted
    back exactly; times the form cannot split fall back to the convs alone, scaled."""
    model, x, analysis, lm, _ = toy_model
    half = {i: max(1, g.size // 2) for i, g in enumerate(analysis.groups) if g.prunable}
    made = {name: 1.25 * c + 2e-6 * a for name, (c, a) in
            {"full": lm.conv_terms(), "half": lm.conv_terms(half)}.items()}
    monkeypatch.setattr(latency, "compare", lambda models, **kw: {n: {"ms": made[n]} for n in models})
    assert latency._fit(model, analysis, lm, x, lm.setting) == pytest.approx((1.25, 2e-6))
    made["half"] = made["full"]  # pruning saved nothing: no positive split exists
    assert latency._fit(model, analysis, lm, x, lm.setting) == (made["full"] / lm.conv_terms()[0], 0.0)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    torch.manual_seed(0)
    model, x = Toy().eval(), torch.zeros(1, 3, 32, 32)
    analysis = analyze(model, x)
    cache = tmp_path_factory.mktemp("cache")
    return model, x, analysis, latency_model(model, analysis, x, threads=1, cache_dir=cache), cache


def test_tables_cover_every_conv_and_a_second_build_measures_nothing(toy_model):
    model, x, analysis, lm, cache = toy_model
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)}
    assert set(lm.tables) == convs and lm.measured > 0
    for name, table in lm.tables.items():
        out, inp = analysis.shapes[name][:2]
        assert table["out"][-1] == out and table["in"][-1] == inp and len(table["ms"]) == len(table["out"])
    again = latency_model(model, analysis, x, threads=1, cache_dir=cache)
    assert again.measured == 0 and again.predict() == lm.predict() and again.round_to == lm.round_to
    assert lm.setting.threads == 1 and "x1 threads" in lm.setting.key()


def test_latency_target_reaches_the_predicted_budget(toy_model):
    model, x, analysis, lm, _ = toy_model
    scores = {i: torch.rand(g.size) for i, g in enumerate(analysis.groups) if g.prunable}
    keep = select_channels(analysis, scores, amount=0.3, target="latency", latency=lm, max_ratio=0.95)
    kept = {i: len(k) for i, k in keep.items()}
    assert cost(analysis, kept, lm)["latency"] <= 0.7 * lm.predict() + 1e-9
    with pytest.raises(ValueError, match="latency model"):
        select_channels(analysis, scores, amount=0.3, target="latency")


def test_latency_target_removes_the_channels_that_save_most_per_score(toy_model, monkeypatch):
    """Equal scores: the group whose channels save the most milliseconds goes first."""
    _, _, analysis, lm, _ = toy_model
    prunable = [i for i, g in enumerate(analysis.groups) if g.prunable]
    costly = prunable[1]
    monkeypatch.setattr(lm, "per_channel", lambda: {i: 10.0 if i == costly else 0.1 for i in prunable})
    scores = {i: torch.ones(analysis.groups[i].size) for i in prunable}
    keep = select_channels(analysis, scores, amount=0.01, target="latency", latency=lm)
    assert costly in keep and len(keep[costly]) < analysis.groups[costly].size
