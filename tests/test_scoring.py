"""TaylorFO scores against an independent oracle: autograd on per-sample channel masks.

Multiplying a channel by a mask m (= 1) at every gate of its group, dL/dm[n, c] is exactly the
first-order change of L = <gy, y> when channel c of sample n is scaled away, i.e. z[n, c]. The
oracle gets it from autograd in float64, without the hooks or the kernel.
"""

import copy
import json

import pytest
import torch

import polyprune_ext
from polyprune_ext import (analyze, baseline_scores, cost, model_stats, recalibrate_bn, score,
                           select_channels)
from polyprune_ext.scoring.baselines import weight_scores
from polyprune_ext.scoring.taylor import unit_output_gradient
from polyprune_ext.testing import Tokens, Toy, process_group, randomize_norms


def mse(y, target):
    return torch.nn.functional.mse_loss(y, target, reduction="sum")


def oracle_z(model, analysis, x, gy):
    """{group: z (N, size)} for L = <gy, model(x)>, from masks at every gate."""
    masks = {i: torch.ones(x.shape[0], g.size, dtype=x.dtype, requires_grad=True)
             for i, g in enumerate(analysis.groups) if g.prunable}
    handles = []
    for i in masks:
        for gate in analysis.groups[i].gates:
            def hook(module, inputs, out, gate=gate, mask=masks[i]):
                shape = [1] * out.dim()
                shape[0], shape[gate.dim] = mask.shape
                size = mask.shape[1]
                parts = [out.narrow(gate.dim, 0, gate.offset),
                         out.narrow(gate.dim, gate.offset, size) * mask.view(shape),
                         out.narrow(gate.dim, gate.offset + size, out.shape[gate.dim] - gate.offset - size)]
                return torch.cat(parts, gate.dim)
            handles.append(model.get_submodule(gate.module).register_forward_hook(hook))
    (model(x) * gy).sum().backward()
    for h in handles:
        h.remove()
    return {i: m.grad for i, m in masks.items()}


def reduce_z(z, reduce):
    return {"abs_sum": z.sum(0).abs(), "sum_abs": z.abs().sum(0), "sum_sq": z.square().sum(0)}[reduce]


def toy(seed=0):
    torch.manual_seed(seed)
    model = Toy().double().eval()
    randomize_norms(model)
    return model


def data(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64), \
        torch.randn(n, 2, 8, 8, generator=gen, dtype=torch.float64)


def assert_scores_equal(got, expected, rtol=1e-9):
    """Equal within rtol, relative to each group's largest score (near-cancelling sums are
    only as exact as the scores around them)."""
    assert got.keys() == expected.keys()
    for i in got:
        torch.testing.assert_close(got[i], expected[i], rtol=rtol, atol=rtol * expected[i].abs().max())


@pytest.mark.parametrize("reduce", ["abs_sum", "sum_abs", "sum_sq"])
@pytest.mark.parametrize("grad", ["loss", "normalized"])
@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_scores_are_the_first_order_change_of_the_output(backend, grad, reduce):
    model, (x, target) = toy(), data()
    got = score(model, [(x, target)], loss_fn=mse, grad=grad, reduce=reduce, backend=backend,
                progress=False)
    assert all(p.grad is None for p in model.parameters()) and not model.training  # left as it was
    y = model(x)
    (gy,) = torch.autograd.grad(mse(y, target), y)
    if grad == "normalized":
        gy = gy / gy.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    z = oracle_z(model, got.analysis, x, gy)
    assert_scores_equal(got.values, {i: reduce_z(v, reduce) for i, v in z.items()})
    assert any(len(g.gates) > 1 for g in got.analysis.prunable)  # groups summed over gates


@pytest.mark.parametrize("arch, encoder", [("Unet", "resnet18"), ("FPN", "mobilenet_v2")])
def test_fused_and_torch_paths_agree_on_smp(arch, encoder):
    """Two structures: skip concatenations over a ResNet; FPN additions over inverted residuals
    with depthwise convs."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = getattr(smp, arch)(encoder, encoder_weights=None).eval()
    x, y = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits
    analysis = analyze(model, x[:1])  # once: every run below scores the same structure
    for grad in ("loss", "normalized", "random"):
        for reduce in ("abs_sum", "sum_abs", "sum_sq"):
            fused, eager = (score(model, [(x, y)], loss_fn=loss, grad=grad, reduce=reduce,
                                  analysis=analysis, backend=b, progress=False).values
                            for b in ("fused", "torch"))
            assert_scores_equal(fused, eager, rtol=1e-4)


def test_normalized_scores_ignore_each_samples_loss_scale():
    model, (x, target) = toy(), data(4)
    weights = torch.tensor([1.0, 10.0, 0.01, 3.0], dtype=torch.float64).view(-1, 1, 1, 1)

    def weighted(y, t):
        return ((y - t).square() * weights).sum()

    plain = score(model, [(x, target)], loss_fn=mse, progress=False).values
    assert_scores_equal(score(model, [(x, target)], loss_fn=weighted, progress=False).values, plain)
    loss_mode = score(model, [(x, target)], loss_fn=weighted, grad="loss", progress=False).values
    with pytest.raises(AssertionError):
        assert_scores_equal(loss_mode, score(model, [(x, target)], loss_fn=mse, grad="loss",
                                             progress=False).values)


def test_random_mode_is_reproducible_and_label_free():
    model, (x, _) = toy(), data()
    first, again, other = (score(model, [x], grad="random", seed=s, progress=False).values
                           for s in (0, 0, 1))
    assert_scores_equal(first, again, rtol=0)
    assert any(not torch.equal(first[i], other[i]) for i in first)


def test_sample_with_zero_output_gradient_is_skipped():
    model, (x, target) = toy(), data(3)
    target[0] = model(x)[0].detach()  # sample 0 already exact: its gradient is zero
    got = score(model, [(x, target)], loss_fn=mse, progress=False)
    without = score(model, [(x[1:], target[1:])], loss_fn=mse, progress=False)
    assert got.skipped_samples == 1
    assert_scores_equal(got.values, without.values)


def test_sample_with_zero_output_gradient_is_skipped_inside_training():
    model, (x, target) = toy(), data(3)
    target[0] = model(x)[0].detach()  # sample 0 already exact: its gradient is zero
    without = score(model, [(x[1:], target[1:])], loss_fn=mse, progress=False).values
    pruner = polyprune_ext.Pruner(model, example_input=x)  # nonfinite="raise": 0/0 would raise
    with pruner.scoring():
        mse(model(x), target).backward()
    assert pruner.stats == {"batches": 1, "skipped_batches": 0, "skipped_samples": 1}
    assert_scores_equal(pruner.scores(), without)


def test_in_training_scores_equal_a_scoring_pass_where_backward_is_separable():
    model, (x, target) = toy(), data()
    expected = score(model, [(x, target)], loss_fn=mse, progress=False).values
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = polyprune_ext.Pruner(model, optimizer, example_input=x)
    with pruner.scoring():  # eval-mode BatchNorm: separable per sample
        mse(model(x), target).backward()
    assert_scores_equal(pruner.scores(), expected)


def test_in_training_scores_under_train_mode_batch_norm_are_an_approximation():
    """Measured, not exact: batch statistics couple the samples' backward passes."""
    model, (x, target) = toy(), data(8)
    model.train()
    pruner = polyprune_ext.Pruner(model, example_input=x)
    with pruner.scoring():
        mse(model(x), target).backward()
    approx = pruner.scores()
    y = model(x)
    (gy,) = torch.autograd.grad(mse(y, target), y)
    exact = oracle_z(model, pruner.analysis, x, unit_output_gradient(gy)[0])
    a = torch.cat([approx[i] for i in exact])
    e = torch.cat([v.sum(0).abs() for v in exact.values()])
    difference = ((a - e).norm() / e.norm()).item()
    ranks = torch.corrcoef(torch.stack([a.argsort().argsort().double(), e.argsort().argsort().double()]))[0, 1]
    print(f"train-mode BatchNorm: relative difference {difference:.3f}, rank correlation {ranks:.3f}")
    assert 0 < difference < 1 and ranks > 0.5


def test_grad_scaler_is_undone_in_loss_mode():
    model, (x, target) = toy(), data()
    model.float()
    x, target = x.float(), target.float()
    plain = score(model, [(x, target)], loss_fn=mse, grad="loss", progress=False).values
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pruner = polyprune_ext.Pruner(model, example_input=x, grad="loss", scaler=scaler)
    with pruner.scoring():
        scaler.scale(mse(model(x), target)).backward()
    assert_scores_equal(pruner.scores(), plain, rtol=1e-4)


def test_grad_scaler_is_undone_in_normalized_mode_and_overflows_are_skipped():
    model, (x, target) = toy(), data()
    model.float()
    x, target = x.float(), target.float()
    plain = score(model, [(x, target)], loss_fn=mse, progress=False).values
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pruner = polyprune_ext.Pruner(model, example_input=x, scaler=scaler)  # so nonfinite="skip"
    with pruner.scoring():
        scaler.scale(mse(model(x), target)).backward()
    scaler.update(2.0 ** 127)  # the next step overflows float32: inf gradients
    with pruner.scoring():
        scaler.scale(mse(model(x), target)).backward()
    assert not all(p.grad.isfinite().all() for p in model.parameters())  # it did overflow
    assert pruner.stats == {"batches": 1, "skipped_batches": 1, "skipped_samples": 0}
    assert_scores_equal(pruner.scores(), plain, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_channels_last_give_close_scores(dtype):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None).eval()
    x, y = torch.randn(2, 3, 64, 64), torch.rand(2, 1, 64, 64)
    reference = score(model, [(x, y)], loss_fn=mse, progress=False).values
    model = model.to(memory_format=torch.channels_last)
    pruner = polyprune_ext.Pruner(model, example_input=x)
    with pruner.scoring(), torch.autocast("cpu", dtype=dtype):
        mse(model(x.to(memory_format=torch.channels_last)).float(), y).backward()
    got = pruner.scores()
    a, e = torch.cat([got[i] for i in reference]), torch.cat(list(reference.values()))
    assert ((a - e).norm() / e.norm()).item() < 0.1


def test_nonfinite_batches_raise_or_are_skipped():
    model, (x, target) = toy(), data()
    bad = target.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="nonfinite='skip'"):
        score(model, [(x, bad)], loss_fn=mse, progress=False)
    got = score(model, [(x, bad), (x, target)], loss_fn=mse, nonfinite="skip", progress=False)
    assert (got.batches, got.skipped_batches) == (1, 1)
    assert_scores_equal(got.values, score(model, [(x, target)], loss_fn=mse, progress=False).values)


def test_bad_input_is_refused_clearly():
    model, (x, target) = toy(), data()
    with pytest.raises(TypeError, match=r"\(images, targets\) pairs"):
        score(model, [x], loss_fn=mse, progress=False)
    with pytest.raises(TypeError, match="expected"):
        score(model, [{"pixels": x}], loss_fn=mse, progress=False)
    with pytest.raises(TypeError, match="'image' but no 'mask'"):
        score(model, [{"image": x}], loss_fn=mse, progress=False)
    assert score(model, [{"image": x}], grad="random", progress=False).batches == 1  # no loss
    with pytest.raises(ValueError, match="loss_fn"):
        score(model, [(x, target)], progress=False)
    with pytest.raises(ValueError, match="grad must be"):
        score(model, [(x, target)], loss_fn=mse, grad="gradient", progress=False)
    with pytest.raises(ValueError, match="no prunable channel groups"):
        score(torch.nn.Conv2d(3, 2, 1).double(), [(x, target)], loss_fn=mse, progress=False)


def test_no_scored_batch_is_an_error():
    """Rather than all-zero scores, on which pruning would choose channels arbitrarily."""
    model, (x, target) = toy(), data()
    with pytest.raises(RuntimeError, match=r"no batch was scored \(0 read, 0 skipped"):
        score(model, [], loss_fn=mse, example_input=x[:1], progress=False)
    bad = target.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"\(2 read, 2 skipped for NaN or Inf"):
        score(model, [(x, bad)] * 2, loss_fn=mse, nonfinite="skip", progress=False)
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


def down_up_group(analysis):
    """The index of the group of down's output channels, which are up's input channels."""
    return next(i for i, g in enumerate(analysis.groups) if g.prunable and [s.name for s in g.slots] ==
                ["down.weight", "down.bias", "up.weight"])


def test_magnitude_baselines():
    model = toy()
    analysis = analyze(model, data()[0][:1])
    l1 = weight_scores(model, analysis, "l1")
    i = down_up_group(analysis)
    expected = model.down.weight.abs().sum((1, 2, 3)) + model.down.bias.abs() + model.up.weight.abs().sum((1, 2, 3))
    torch.testing.assert_close(l1[i], expected.detach())
    bn = weight_scores(model, analysis, "bn_scale")
    assert torch.isinf(bn[i]).all()  # no norm in that group: never chosen
    assert_scores_equal(weight_scores(model, analysis, "random", seed=3),
                        weight_scores(model, analysis, "random", seed=3), rtol=0)


def test_l2_baseline_is_the_filter_norm():
    model = toy()
    analysis = analyze(model, data()[0][:1])
    l2 = weight_scores(model, analysis, "l2")
    i = down_up_group(analysis)
    expected = (model.down.weight.square().sum((1, 2, 3)) + model.down.bias.square()
                + model.up.weight.square().sum((1, 2, 3))).sqrt()
    assert l2[i].dtype == torch.float64
    torch.testing.assert_close(l2[i], expected.detach())


def test_pruner_prunes_and_training_goes_on():
    model, (x, target) = toy(), data()
    model.float()
    x, target = x.float(), target.float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = polyprune_ext.Pruner(model, optimizer, example_input=x)
    with pytest.raises(RuntimeError, match="no batch has been scored"):
        pruner.prune(0.3)
    for _ in range(2):
        with pruner.scoring():
            mse(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    before = model_stats(model, x[:1]).flops
    twin = copy.deepcopy(model)
    step = pruner.prune(0.3, target="flops", data=[x, x * 2])  # then BatchNorms re-estimated
    assert model_stats(model, x[:1]).flops <= 0.7 * before
    polyprune_ext.PruningPlan([1, *x.shape[1:]]).prune_(
        twin, analyze(twin, x[:1]), {int(i): k for i, k in step["keep"].items()})
    recalibrate_bn(twin, [x, x * 2])
    for (name, ours), theirs in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(ours, theirs), name
    assert pruner.stats["batches"] == 0  # scores reset, on a new analysis
    with pruner.scoring():
        mse(model(x), target).backward()
    optimizer.step()


def _ddp_rank(rank, world, init_file, out_dir):
    with process_group(rank, world, init_file):
        model, (x, target) = toy(), data(4)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        pruner = polyprune_ext.Pruner(ddp, example_input=x)
        with pruner.scoring():
            mse(ddp(x[rank * 2:rank * 2 + 2]), target[rank * 2:rank * 2 + 2]).backward()
        step = pruner.prune(0.4, target="channels")
        (out_dir / f"rank{rank}.json").write_text(json.dumps(step))


def test_ddp_ranks_prune_the_same_channels(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    torch.multiprocessing.spawn(_ddp_rank, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    steps = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    model, (x, target) = toy(), data(4)  # one process, both halves
    pruner = polyprune_ext.Pruner(model, example_input=x)
    for r in range(2):
        with pruner.scoring():
            mse(model(x[r * 2:r * 2 + 2]), target[r * 2:r * 2 + 2]).backward()
    assert steps[0] == steps[1] == pruner.prune(0.4, target="channels")


def test_layer_normalization_and_flops_weighting():
    model, (x, target) = toy(), data()
    plain = score(model, [(x, target)], loss_fn=mse, progress=False)
    normalized = score(model, [(x, target)], loss_fn=mse, normalize_layers=True, progress=False)
    for i, v in normalized.values.items():
        torch.testing.assert_close(v, plain.values[i] / plain.values[i].norm())
    weighted = score(model, [(x, target)], loss_fn=mse, flops_weighted=True, progress=False)
    full = cost(plain.analysis)["flops"]
    for i, v in weighted.values.items():
        size = plain.analysis.groups[i].size
        per_channel = full - cost(plain.analysis, {i: size - 1})["flops"]
        assert per_channel > 0
        torch.testing.assert_close(v * per_channel, plain.values[i])
    both = score(model, [(x, target)], loss_fn=mse, normalize_layers=True, flops_weighted=True,
                 progress=False)
    for i, v in both.values.items():  # normalised first, or the normalisation would cancel the FLOPs
        size = plain.analysis.groups[i].size
        per_channel = full - cost(plain.analysis, {i: size - 1})["flops"]
        torch.testing.assert_close(v * per_channel, normalized.values[i])
    l1 = baseline_scores(model, "l1", example_input=x[:1])
    assert l1.values.keys() == plain.values.keys() and l1.batches == 0


@pytest.mark.parametrize("reduce", ["abs_sum", "sum_sq"])
def test_scores_on_linear_layers_over_channels_last_tokens(reduce):

    torch.manual_seed(0)
    model = Tokens().double().eval()
    x, target = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randn(3, 2, 8, 8, dtype=torch.float64)
    got = score(model, [(x, target)], loss_fn=mse, grad="loss", reduce=reduce, progress=False)
    assert any(gate.dim == 3 for g in got.analysis.prunable for gate in g.gates)  # on tokens
    y = model(x)
    (gy,) = torch.autograd.grad(mse(y, target), y)
    z = oracle_z(model, got.analysis, x, gy)
    assert_scores_equal(got.values, {i: reduce_z(v, reduce) for i, v in z.items()})


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_scores_on_a_3d_network(backend):
    """Volumes (N, C, D, H, W): MONAI's 3-D UNet (PReLU, instance norms, transposed convs, GPU
    kernels read 3 spatial dims) against the mask oracle."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    model = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16),
                      strides=(2, 2), num_res_units=1).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 16, 16, 16, generator=gen, dtype=torch.float64)
    target = torch.randn(2, 2, 16, 16, 16, generator=gen, dtype=torch.float64)
    got = score(model, [(x, target)], loss_fn=mse, grad="loss", reduce="sum_abs", backend=backend,
                progress=False)
    y = model(x)
    (gy,) = torch.autograd.grad(mse(y, target), y)
    z = oracle_z(model, got.analysis, x, gy)
    assert_scores_equal(got.values, {i: reduce_z(v, "sum_abs") for i, v in z.items()})
    assert len(got.values) == 4


@pytest.mark.parametrize("normalize_layers, flops_weighted", [(True, False), (False, True), (True, True)])
def test_pruner_prunes_on_weighted_scores(normalize_layers, flops_weighted):
    model, (x, target) = toy(), data()
    raw = score(model, [(x, target)], loss_fn=mse, progress=False)
    analysis, full = raw.analysis, cost(raw.analysis)["flops"]
    weighted = {}
    for i, v in raw.values.items():  # by hand: per-layer L2 norm, then one channel's FLOPs
        if normalize_layers:
            v = v / v.norm()
        if flops_weighted:
            v = v / (full - cost(analysis, {i: analysis.groups[i].size - 1})["flops"])
        weighted[i] = v

    def choice(scores):
        keep = select_channels(analysis, scores, amount=0.3, target="flops")
        return {str(i): k.tolist() for i, k in sorted(keep.items())}

    expected = choice(weighted)
    assert expected != choice(raw.values)  # the weighting changes what goes
    pruner = polyprune_ext.Pruner(model, example_input=x, normalize_layers=normalize_layers,
                                  flops_weighted=flops_weighted)
    with pruner.scoring():
        mse(model(x), target).backward()
    assert pruner.prune(0.3, target="flops")["keep"] == expected
