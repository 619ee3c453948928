"""What every library entry point promises about the model it is given: each submodule keeps its
own train/eval mode, and a model it cannot work on (no parameters, on the meta device, nothing
prunable) gets one clear ValueError rather than a StopIteration or a torch error."""

import pytest
import torch

import polyprune_ext
from polyprune_ext import (Pruner, PruningPlan, analyze, baseline_scores, latency, magnitude_prune_,
                           model_stats, score)
from polyprune_ext.testing import Toy

X = torch.randn(2, 3, 16, 16)


def loss(y, target):
    return (y - target).square().mean()


def mixed_modes():
    """A model training with part of it frozen in eval mode, as when fine-tuning a decoder."""
    model = Toy().train()
    model.stem_bn.eval()
    model.down.eval()
    return model, {name: m.training for name, m in model.named_modules()}


CALLS = {
    "score": lambda m: score(m, [(X, torch.randn(2, 2, 16, 16))], loss_fn=loss, progress=False),
    "model_stats": lambda m: model_stats(m, X),
    "analyze": lambda m: analyze(m, X),
    "latency": lambda m: latency(m, size=16, warmup=0, repeats=1),
}


@pytest.mark.parametrize("call", CALLS)
def test_every_submodule_keeps_its_mode(call):
    model, modes = mixed_modes()
    CALLS[call](model)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_trainer_evaluate_keeps_every_submodule_mode(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    from polyprune_ext.engine import TrainConfig, Trainer
    from polyprune_ext.models import smp_model
    from polyprune_ext.tasks.polyp import TASK, SyntheticPolyps

    data = SyntheticPolyps(4, size=32, val_count=2)
    model = smp_model("Unet", "resnet18", encoder_depth=3, decoder_channels=(16, 8, 4)).train()
    model.encoder.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    trainer = Trainer(model, TASK, data, data, TrainConfig(batch_size=2), progress=False)
    trainer.evaluate()
    assert {name: m.training for name, m in trainer.model.named_modules()} == modes


NO_PARAMETERS = {
    "score": lambda m: score(m, [(X, X)], loss_fn=loss),
    "baseline_scores": lambda m: baseline_scores(m, "l1", example_input=X),
    "Pruner": lambda m: Pruner(m, example_input=X),
}


@pytest.mark.parametrize("call", NO_PARAMETERS)
def test_a_model_without_parameters_is_refused(call):
    with pytest.raises(ValueError, match="Identity.*has no parameters"):
        NO_PARAMETERS[call](torch.nn.Identity())


ON_META = {
    **NO_PARAMETERS,
    "analyze": lambda m: analyze(m, X),
    "model_stats": lambda m: model_stats(m, X),
    "magnitude_prune_": lambda m: magnitude_prune_(m, 0.5),
    "save": lambda m: polyprune_ext.save("never.safetensors", m, PruningPlan([1, 3, 16, 16])),
    "drop_unused_": lambda m: PruningPlan([1, 3, 16, 16]).drop_unused_(m),
}


@pytest.mark.parametrize("call", ON_META)
def test_a_model_on_the_meta_device_is_refused(call, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with torch.device("meta"):
        model = Toy()
    with pytest.raises(ValueError, match="Toy.*meta device"):
        ON_META[call](model)
    assert not list(tmp_path.iterdir())  # nothing written


class Frozen(torch.nn.Module):
    """One conv whose every channel is frozen: its input is the model input, its output the model's."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("criterion", ["taylor", "l1", "l2", "bn_scale", "random"])
def test_no_prunable_group_is_refused_by_every_criterion(criterion):
    model = Frozen()
    with pytest.raises(ValueError, match="no prunable channel groups"):
        if criterion == "taylor":
            score(model, [(X, torch.randn(2, 2, 16, 16))], loss_fn=loss, progress=False)
        else:
            baseline_scores(model, criterion, example_input=X)


def test_a_paramless_model_gets_an_empty_plan_step_list():
    plan = PruningPlan([1, 3, 16, 16])
    assert plan.drop_unused_(torch.nn.Identity()) == [] and plan.steps == []


def test_pruning_nothing_records_no_step():
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, optimizer, example_input=X)
    with pruner.scoring():
        model(X).sum().backward()
    params = sum(p.numel() for p in model.parameters())
    pruner.prune(0.0)
    assert pruner.plan.steps == [] and sum(p.numel() for p in model.parameters()) == params
    analysis = analyze(model, X)
    everything = {i: torch.arange(g.size) for i, g in enumerate(analysis.groups) if g.prunable}
    pruner.plan.prune_(model, analysis, everything)  # every channel kept: nothing removed
    assert pruner.plan.steps == []
    with pruner.scoring():
        model(X).sum().backward()
    pruner.prune(0.3)
    assert len(pruner.plan.steps) == 1
