"""The nuclei model, its loss and metrics, structural pruning and checkpoints of it, and the
magnitude compression sweep."""

import copy
import json

import pytest
import torch

import polyprune_ext
from polyprune_ext import PruningPlan, analyze
from polyprune_ext.engine import TrainConfig, Trainer, sweep
from polyprune_ext.testing import prune_and_compare
from polyprune_ext.unstructured import load_compressed, magnitude

pytest.importorskip("segmentation_models_pytorch")
from polyprune_ext.tasks.nuclei import TASK, NucleiNet, instance_targets, nuclei_datasets  # noqa: E402
from polyprune_ext.tasks.nuclei import NucleiMetrics, nuclei_loss  # noqa: E402


def two_nuclei(size=32):
    labels = torch.zeros(size, size, dtype=torch.int64)
    labels[4:14, 4:14] = 1
    labels[14:24, 6:16] = 7  # touching the first
    return labels


@pytest.mark.parametrize("shared", [False, True])
def test_model_output_and_structural_pruning(shared):
    torch.manual_seed(0)
    model = NucleiNet("Unet", "resnet18", shared_encoder=shared)
    assert hasattr(model.regression, "encoder") != shared
    x = torch.randn(1, 3, 64, 64)
    assert model.eval()(x).shape == (1, 2, 64, 64)
    # both branches' heads keep their output channel; the rest prunes with function preserved
    analysis, before, after, error = prune_and_compare(model, x, 0.5)
    assert error <= 1e-6
    assert after.params < before.params and after.flops < before.flops


def test_checkpoint_rebuilds_a_pruned_nuclei_model(tmp_path):
    torch.manual_seed(0)
    model = NucleiNet("Unet", "resnet18", shared_encoder=True).eval()
    x = torch.randn(1, 3, 64, 64)
    plan = PruningPlan.for_model(model, x.shape)
    assert plan.base == {"family": "nuclei", "kwargs": model.spec}
    analysis = analyze(model, x)
    keep = {i: torch.arange(g.size // 2) for i, g in enumerate(analysis.groups) if g.prunable}
    plan.prune_(model, analysis, keep)
    polyprune_ext.save(tmp_path / "m.safetensors", model, plan)
    loaded = polyprune_ext.load(tmp_path / "m.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_loss_and_metrics_against_hand_values():
    labels = two_nuclei()
    mask, distance = instance_targets(labels.numpy())
    target = torch.stack([torch.from_numpy(mask), torch.from_numpy(distance), labels.float()])[None]
    perfect = torch.stack([(target[0, 0] * 2 - 1) * 20, target[0, 1]])[None]
    metrics = NucleiMetrics()
    metrics.update(perfect, target)
    result = metrics.compute()
    assert result["dice"] == pytest.approx(1.0) and result["mse"] == 0.0
    # watershed from the true maps finds both nuclei; only the tied border pixels may swap sides
    assert result["dq"] == 1.0 and result["aji"] > 0.95 and result["images"] == 1
    # loss: BCE of +-20 logits is ~2e-9, soft Dice of sigmoid(+-20) ~0, MSE 0
    assert nuclei_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    shifted = perfect.clone()
    shifted[:, 1] += 0.5
    assert nuclei_loss(shifted, target).item() == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(ValueError, match="expected output"):
        metrics.update(perfect[:, :1], target)


def test_targets_follow_the_labels():
    train, val = nuclei_datasets(None, count=6, size=64, val_count=2)
    assert len(train) == 4 and len(val) == 2
    image, target = val[0]
    assert image.shape == (3, 64, 64) and target.shape == (3, 64, 64)
    mask, distance = instance_targets(target[2].long().numpy())
    assert torch.equal(target[0], torch.from_numpy(mask))
    assert torch.equal(target[1], torch.from_numpy(distance))


def test_sparsity_helpers():
    assert magnitude.sparsity_for(16) == 0.9375 and magnitude.sparsity_for(1) == 0
    with pytest.raises(ValueError, match="at least 1"):
        magnitude.sparsity_for(0.5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
    magnitude.magnitude_prune_(model, 0.75)
    state = magnitude.permanent_state_dict(model)
    magnitude.make_permanent_(model)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # zeros of a reloaded pruned model stay zero through training once held
    magnitude.hold_zeros_(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 8, 8)).square().sum().backward()
    optimizer.step()
    model(torch.randn(1, 3, 8, 8))  # the masks apply at the next forward
    assert magnitude.sparsity_of(magnitude.prunable_tensors(model)) == pytest.approx(0.75, abs=0.01)


def test_crossings_and_table():
    rows = [{"scope": s, "cr": cr, "dice": d, "mse": m}
            for s, cr, d, m in [("layer", 2, 0.90, 0.01), ("global", 2, 0.89, 0.02),
                                ("layer", 16, 0.80, 0.05), ("global", 16, 0.85, 0.03),
                                ("layer", 64, 0.60, 0.09), ("global", 64, 0.70, 0.08)]]
    assert sweep.crossings(rows, "dice", True) == [(16, "global")]
    assert sweep.crossings(rows, "mse", False) == [(16, "global")]
    for r in rows:
        r.update(dense_mb=10.0, compressed_mb=10.0 / r["cr"])
    table = sweep.sweep_table(rows, TASK.reported)
    assert "| 16 | 93.75% | 0.8000 | 0.8500 | 0.0500 | 0.0300 | 10.0 | 0.6, 0.6 |" in table
    assert sweep.crossing_summary(rows, TASK.reported)[0] == "- semantic Dice: network-wide ahead from CR 16"
    ahead = [dict(r, dice=r["dice"] + (0.2 if r["scope"] == "layer" else 0)) for r in rows]
    assert sweep.crossing_summary(ahead, TASK.reported)[0] == \
        "- semantic Dice: layer-wise ahead wherever the scopes differ"
    assert sweep.crossing_summary([r for r in rows if r["scope"] == "layer"], TASK.reported)[0] == \
        "- semantic Dice: no CR at which the two scopes differ"


def test_sweep_prunes_fine_tunes_restores_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = NucleiNet("Unet", "resnet18")
    train, val = nuclei_datasets(None, count=6, size=64, val_count=2)
    trainer = Trainer(model, TASK, train, val, TrainConfig(batch_size=2), out_dir=tmp_path / "trained",
                      progress=False)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    logged = []
    rows = sweep.compression_sweep(trainer, crs=(1, 4, 16), scopes=("layer", "global"),
                                   finetune_epochs=1, finetune_lr=1e-4, out_dir=tmp_path / "points",
                                   on_row=lambda rows: logged.append(len(rows)))
    assert logged == [1, 2, 3, 4, 5, 6] and trainer.out_dir == tmp_path / "trained"
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 1e-4
    assert [(r["scope"], r["cr"]) for r in rows] == [(s, c) for s in ("layer", "global") for c in (1, 4, 16)]
    for r in rows:
        assert r["sparsity"] == pytest.approx(magnitude.sparsity_for(r["cr"]), abs=2e-3)
        assert {"dice", "mse", "aji", "pq", "dice_pruned", "dice_recalibrated"} <= r.keys()
    layer16 = next(r for r in rows if r["scope"] == "layer" and r["cr"] == 16)
    # CR 1 prunes nothing and every point fine-tunes from the same random state: scopes agree
    def numbers(row):
        return {k: v for k, v in row.items() if k != "scope"}
    cr1 = [numbers(r) for r in rows if r["cr"] == 1]
    assert cr1[0] == pytest.approx(cr1[1], rel=1e-6)
    assert layer16["compressed_mb"] < 0.2 * layer16["dense_mb"]
    assert model.state_dict().keys() == trained.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    # a point reloads as a plain model with the sparsity it was logged with
    state = load_compressed(sweep.point_path(tmp_path / "points", "layer", 16))
    zeros = sum(int((state[n + ".weight"] == 0).sum()) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Conv2d))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert zeros / total == pytest.approx(layer16["sparsity"], abs=1e-6)
    # resume after the first two points: the layer-wise CR 16 point continues from CR 4's file
    resumed = sweep.compression_sweep(trainer, crs=(1, 4, 16), scopes=("layer",), finetune_epochs=1,
                                      finetune_lr=1e-4,
                                      out_dir=tmp_path / "points", rows=json.loads(json.dumps(rows[:2])))
    assert len(resumed) == 3 and numbers(resumed[2]) == pytest.approx(numbers(layer16), rel=1e-5)


def test_one_shot_point_is_the_trained_model_pruned_once(tmp_path):
    """Without fine-tuning or re-calibration, a one-shot point is the trained model pruned straight
    to its CR, each network by its own threshold: evaluated the same as pruning a copy by hand."""
    torch.manual_seed(0)
    model = NucleiNet("Unet", "resnet18")
    train, val = nuclei_datasets(None, count=4, size=64, val_count=2)
    trainer = Trainer(model, TASK, train, val, TrainConfig(batch_size=2), progress=False)
    rows = sweep.compression_sweep(trainer, crs=(4, 16), scopes=("global",), gradual=False,
                                   finetune_epochs=0, first=False, bn_recal_images=0)
    by_hand = copy.deepcopy(model)
    for network in by_hand.networks().values():
        magnitude.magnitude_prune_(network, magnitude.sparsity_for(16), scope="global", first=False)
    trainer.model = by_hand
    expected = trainer.evaluate()
    assert rows[1]["cr"] == 16 and rows[1]["sparsity"] == pytest.approx(0.9375, abs=1e-3)
    assert {k: rows[1][k] for k in expected} == pytest.approx(expected, rel=1e-6)
