"""Pruned models saved as a state_dict plus a JSON plan (in the safetensors metadata, or beside a
torch file), and loaded into a fresh base model."""


import pytest
import torch

import polyprune_ext
from polyprune_ext import PruningPlan, analyze
from polyprune_ext.structure import Dropped, read_plan

smp = pytest.importorskip("segmentation_models_pytorch")
SHAPE = (1, 3, 64, 64)


def pruned_unet(steps=2):
    """Unet-resnet18 pruned twice (a third of every group, then again), and its plan."""
    model = smp.Unet("resnet18", encoder_weights=None, classes=2).eval()
    plan = PruningPlan.for_model(model, SHAPE)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        analysis = analyze(model, torch.zeros(SHAPE))
        keep = {i: torch.randperm(g.size, generator=gen)[: max(1, g.size * 2 // 3)].sort().values
                for i, g in enumerate(analysis.groups) if g.prunable}
        plan.prune_(model, analysis, keep)
    return model, plan


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_gives_identical_outputs(tmp_path, suffix):
    model, plan = pruned_unet()
    path = tmp_path / f"pruned{suffix}"
    polyprune_ext.save(path, model, plan)
    files = [path.name] if suffix == ".safetensors" else [path.name, path.name + ".plan.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # one file, or weights + plan
    loaded = polyprune_ext.load(path).eval()  # the base model is rebuilt from the plan
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert read_plan(path).base["family"] == "smp" and read_plan(path).base["kwargs"]["arch"] == "Unet"
    assert len(read_plan(path).steps) == 2


def test_torch_file_is_a_plain_state_dict(tmp_path):
    model, plan = pruned_unet(steps=1)
    polyprune_ext.save(tmp_path / "m.pt", model, plan)
    state = torch.load(tmp_path / "m.pt", weights_only=True)  # no pickled modules, no code
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_wrong_base_model_is_refused(tmp_path):
    model, plan = pruned_unet(steps=1)
    polyprune_ext.save(tmp_path / "m.safetensors", model, plan)
    wrong = smp.Unet("resnet34", encoder_weights=None, classes=2)
    with pytest.raises(ValueError, match="same base model"):
        polyprune_ext.load(tmp_path / "m.safetensors", base_model=wrong)


def test_round_trip_with_drop_then_prune(tmp_path):
    model = smp.PSPNet("resnet34", encoder_weights=None, classes=2).eval()
    plan = PruningPlan.for_model(model, SHAPE)
    assert plan.drop_unused_(model) == ["encoder.layer3", "encoder.layer4"]
    analysis = analyze(model, torch.zeros(SHAPE))
    keep = {i: torch.arange(0, g.size, 2) for i, g in enumerate(analysis.groups) if g.prunable}
    plan.prune_(model, analysis, keep)
    path = tmp_path / "pspnet.safetensors"
    polyprune_ext.save(path, model, plan)
    from safetensors.torch import load_file

    assert not any(k.startswith(("encoder.layer3.", "encoder.layer4.")) for k in load_file(path))
    loaded = polyprune_ext.load(path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded.encoder.layer4, Dropped)


def test_drop_step_on_a_model_without_the_module_is_refused(tmp_path):
    model = smp.PSPNet("resnet34", encoder_weights=None, classes=2)
    plan = PruningPlan.for_model(model, SHAPE)
    plan.drop_unused_(model)
    polyprune_ext.save(tmp_path / "m.pt", model, plan)
    wrong = smp.PSPNet("mobilenet_v2", encoder_weights=None, classes=2)  # no encoder.layer3
    with pytest.raises(ValueError, match="step 0: cannot drop 'encoder.layer3'"):
        polyprune_ext.load(tmp_path / "m.pt", base_model=wrong)


def test_a_damaged_checkpoint_is_named(tmp_path):
    model, plan = pruned_unet(steps=1)
    polyprune_ext.save(tmp_path / "m.safetensors", model, plan)
    polyprune_ext.save(tmp_path / "m.pt", model, plan)
    data = (tmp_path / "m.safetensors").read_bytes()
    for name, content in [("truncated", data[: len(data) // 2]), ("empty", b""), ("junk", b"x" * 100)]:
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}\.safetensors is not a readable safetensors file"):
            polyprune_ext.load(tmp_path / f"{name}.safetensors")
    (tmp_path / "m.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"m\.pt: the weights cannot be read"):
        polyprune_ext.load(tmp_path / "m.pt")
    plan_file = tmp_path / "m.pt.plan.json"
    plan_file.write_text(plan_file.read_text()[:40])
    with pytest.raises(ValueError, match=r"m\.pt\.plan\.json does not hold a readable pruning plan"):
        polyprune_ext.load(tmp_path / "m.pt")


def one_line(error):
    return "\n" not in str(error.value) and len(str(error.value)) < 600


def test_weights_that_do_not_match_the_plan_are_summarised(tmp_path):
    from safetensors.torch import save_file

    pruned, plan = pruned_unet(steps=1)
    unpruned = smp.Unet("resnet18", encoder_weights=None, classes=2)
    state = {k: v.contiguous() for k, v in unpruned.state_dict().items()}
    save_file(state, tmp_path / "m.safetensors", metadata={"polyprune_plan": plan.to_json()})
    with pytest.raises(ValueError, match=r"m\.safetensors: the weights and the pruning plan disagree: "
                                         r"\d+ of \d+ tensors have other shapes") as error:
        polyprune_ext.load(tmp_path / "m.safetensors")
    assert one_line(error) and "encoder.conv1.weight: [64, 3, 7, 7] against [42, 3, 7, 7]" in str(error.value)


def test_weights_of_another_architecture_are_summarised(tmp_path):
    from safetensors.torch import save_file

    other = smp.Unet("resnet34", encoder_weights=None, classes=2)
    plan = PruningPlan.for_model(smp.Unet("resnet18", encoder_weights=None, classes=2), SHAPE)
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    save_file(state, tmp_path / "m.safetensors", metadata={"polyprune_plan": plan.to_json()})
    with pytest.raises(ValueError, match=r"m\.safetensors: the weights are of another architecture "
                                         r"than the model its plan builds .*: \d+ unexpected") as error:
        polyprune_ext.load(tmp_path / "m.safetensors")
    assert one_line(error)


def test_a_plan_for_another_base_model_is_summarised(tmp_path):
    model, plan = pruned_unet(steps=1)
    polyprune_ext.save(tmp_path / "m.safetensors", model, plan)
    with pytest.raises(ValueError, match=r"m\.safetensors: pruning plan step 0 was made for a model "
                                         r"with 24 channel groups; this model has 32") as error:
        polyprune_ext.load(tmp_path / "m.safetensors",
                           base_model=smp.Unet("resnet34", encoder_weights=None, classes=2))
    assert one_line(error)
    with pytest.raises(ValueError, match=r"group 23: 2 channels, this model 3; 1 of 24 groups differ") as error:
        polyprune_ext.load(tmp_path / "m.safetensors",
                           base_model=smp.Unet("resnet18", encoder_weights=None, classes=3))
    assert one_line(error)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_monai_models_are_rebuilt_from_their_arguments(tmp_path, spatial_dims):
    """monai_model keeps its arguments (JSON, nothing pickled); load builds the network again and
    replays the plan: a pruned SegResNet (group norms pruned by whole groups) in 2-D and 3-D."""
    pytest.importorskip("monai")
    from polyprune_ext.models import monai_model

    shape = (1, 1) + (16,) * spatial_dims
    model = monai_model("SegResNet", spatial_dims=spatial_dims, in_channels=1, out_channels=2,
                        init_filters=8, blocks_down=[1, 1, 1], blocks_up=[1, 1]).eval()
    plan = PruningPlan.for_model(model, shape)
    analysis = analyze(model, torch.zeros(shape))
    keep = {i: torch.arange(g.size // 2) for i, g in enumerate(analysis.groups) if g.prunable}
    plan.prune_(model, analysis, keep)
    polyprune_ext.save(tmp_path / "m.safetensors", model, plan)
    assert read_plan(tmp_path / "m.safetensors").base == {"family": "monai", "kwargs": {
        "name": "SegResNet", "spatial_dims": spatial_dims, "in_channels": 1, "out_channels": 2,
        "init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}}
    loaded = polyprune_ext.load(tmp_path / "m.safetensors").eval()
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_monai_model_refuses_bad_arguments_clearly():
    pytest.importorskip("monai")
    from polyprune_ext.models import monai_model

    with pytest.raises(ValueError, match="unknown MONAI network 'UNetX'; choose one of .*'UNet'"):
        monai_model("UNetX")
    with pytest.raises(ValueError, match="must be JSON data"):
        monai_model("UNet", spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8), strides=range(1))
    with pytest.raises(ValueError, match="UNet.*strides"):
        monai_model("UNet", spatial_dims=2, in_channels=1, out_channels=1, channels=[4, 8])
