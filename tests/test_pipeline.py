"""Training, iterative pruning, magnitude pruning and the polyprune command, end to end on tiny
synthetic runs (64x64, a few images, one epoch: behaviour, not accuracy)."""

import json

import pytest
import torch

smp = pytest.importorskip("segmentation_models_pytorch")

import polyprune_ext  # noqa: E402
from polyprune_ext import cli, model_stats  # noqa: E402
from polyprune_ext.engine import PruneConfig, TrainConfig, Trainer, iterative_prune  # noqa: E402
from polyprune_ext.models import smp_model  # noqa: E402
from polyprune_ext.tasks.polyp import TASK, SyntheticPolyps  # noqa: E402
from polyprune_ext.unstructured import magnitude  # noqa: E402

TINY = ["--size", "64", "--synthetic-count", "16", "--batch-size", "4", "--no-progress"]


def tiny_trainer(out_dir):
    torch.manual_seed(0)
    train = SyntheticPolyps(16, size=64, split="train", val_count=4, augment=True)
    val = SyntheticPolyps(16, size=64, split="val", val_count=4)
    return Trainer(smp_model("Unet", "resnet18"), TASK, train, val, TrainConfig(batch_size=4),
                   out_dir=out_dir, progress=False)


def test_training_checkpoints_every_epoch_and_resumes(tmp_path):
    trainer = tiny_trainer(tmp_path)
    records = trainer.fit(2)
    assert [r["epoch"] for r in records] == [1, 2] and 0 <= records[-1]["dice"] <= 1
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "train_state.pt").exists()
    assert not list(tmp_path.glob("*.tmp"))  # every file replaced whole
    again = tiny_trainer(tmp_path)
    again.resume()
    assert again.epoch == 2 and len(again.history) == 2
    x = torch.randn(1, 3, 64, 64)
    trainer.model.eval(), again.model.eval()
    torch.testing.assert_close(again.model(x), trainer.model(x), rtol=0, atol=0)
    state = trainer.optimizer.state_dict()["state"][0]["exp_avg"]
    torch.testing.assert_close(again.optimizer.state_dict()["state"][0]["exp_avg"], state)


@pytest.mark.parametrize("schedule", [{"step": 0.2}, {"steps": 2}])
def test_iterative_pruning_reaches_the_flops_target(tmp_path, schedule):
    trainer = tiny_trainer(tmp_path)
    optimizer = trainer.optimizer
    rows = iterative_prune(trainer, PruneConfig(amount=0.4, score_batches=1, finetune_epochs=1,
                                                finetune_lr=2e-4, **schedule))
    assert rows[-1]["gflops"] <= 0.6 * rows[0]["gflops"] * (1 + 1e-9) < rows[-2]["gflops"]
    assert all(0 <= r["dice_pruned"] <= 1 for r in rows[1:])  # measured before each fine-tuning
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 2e-4
    assert [r["step"] for r in rows] == list(range(len(rows)))
    if "steps" in schedule:  # the same share of FLOPs each step
        assert len(rows) == 3
        assert rows[1]["gflops"] / rows[0]["gflops"] == pytest.approx(0.6 ** 0.5, abs=0.03)
    assert trainer.optimizer is optimizer  # the same optimizer through every step
    loaded = polyprune_ext.load(tmp_path / "model.safetensors").eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), trainer.model.eval()(x), rtol=0, atol=0)
    assert model_stats(loaded, x).gflops == pytest.approx(rows[-1]["gflops"])


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_scopes(scope):
    torch.manual_seed(0)
    model = smp_model("Unet", "resnet18")
    reached = magnitude.magnitude_prune_(model, 0.75, scope=scope)
    tensors = magnitude.prunable_tensors(model)
    assert reached == pytest.approx(0.75, abs=1e-3)
    weights = torch.cat([getattr(m, n).detach().flatten().double() for m, n in tensors])
    if scope == "global":  # one threshold: every kept weight outweighs every zeroed one
        orig = torch.cat([getattr(m, n + "_orig").detach().flatten().double() for m, n in tensors])
        assert orig[weights != 0].abs().min() >= orig[weights == 0].abs().max()
    else:
        for m, n in tensors:
            assert (getattr(m, n) == 0).double().mean().item() == pytest.approx(0.75, abs=0.01)
    magnitude.make_permanent_(model)
    assert not any("_orig" in k or "_mask" in k for k in model.state_dict())
    assert magnitude.sparsity_of(tensors) == pytest.approx(reached)


@pytest.mark.parametrize("command", ["train", "prune", "sparsify", "eval", "sweep", "demo"])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0
    assert "--data" in capsys.readouterr().out


def test_cli_train_prune_eval(tmp_path, capsys):
    cli.main(["train", "--arch", "Unet", "--encoder", "resnet18", "--epochs", "1",
              "--out", str(tmp_path / "trained"), *TINY])
    cli.main(["prune", "--checkpoint", str(tmp_path / "trained"), "--out", str(tmp_path / "pruned"),
              "--amount", "0.3", "--step", "0.3", "--score-batches", "1", "--finetune-epochs", "1", *TINY])
    for name in ("report.md", "pruning_log.csv", "pruning_log.json", "dice_vs_flops.png", "model.safetensors"):
        assert (tmp_path / "pruned" / name).exists(), name
    rows = json.loads((tmp_path / "pruned" / "pruning_log.json").read_text())
    assert rows[-1]["gflops"] <= 0.7 * rows[0]["gflops"] * (1 + 1e-9)
    capsys.readouterr()
    cli.main(["eval", "--checkpoint", str(tmp_path / "pruned"), *TINY])
    assert 0 <= json.loads(capsys.readouterr().out)["dice"] <= 1
    cli.main(["sparsify", "--checkpoint", str(tmp_path / "trained"), "--out", str(tmp_path / "sparse"),
              "--sparsity", "0.5", "--finetune-epochs", "1", *TINY])
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_cli_trains_and_prunes_a_monai_model(tmp_path, capsys):
    pytest.importorskip("monai")
    spec = ["--arch", "monai.UNet", "--model-args", '{"channels": [8, 16, 32], "strides": [2, 2]}']
    cli.main(["train", *spec, "--epochs", "1", "--out", str(tmp_path / "trained"), *TINY])
    cli.main(["prune", "--checkpoint", str(tmp_path / "trained"), "--out", str(tmp_path / "pruned"),
              "--amount", "0.3", "--step", "0.3", "--score-batches", "1", "--finetune-epochs", "1", *TINY])
    rows = json.loads((tmp_path / "pruned" / "pruning_log.json").read_text())
    assert rows[-1]["gflops"] <= 0.7 * rows[0]["gflops"] * (1 + 1e-9)
    model = polyprune_ext.load(tmp_path / "pruned" / "model.safetensors")  # rebuilt from its arguments
    assert type(model).__module__.startswith("monai") and model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    capsys.readouterr()
    cli.main(["eval", "--checkpoint", str(tmp_path / "pruned"), *TINY])
    assert 0 <= json.loads(capsys.readouterr().out)["dice"] <= 1
    with pytest.raises(SystemExit):  # not a JSON object: argparse says so
        cli.main(["train", "--arch", "monai.UNet", "--model-args", "[8, 16]", "--out", str(tmp_path / "x")])


def test_cli_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        cli.main(["eval", "--checkpoint", str(tmp_path), *TINY])


def test_interrupted_pruning_resumes_where_it_stopped(tmp_path):
    """A crash during step 2's fine-tuning: resuming finishes that step and reaches the target."""
    trainer = tiny_trainer(tmp_path)
    config = PruneConfig(amount=0.4, steps=2, score_batches=1, finetune_epochs=2)
    logged = []

    def crash_in_step_two(rows):
        logged[:] = [dict(r) for r in rows]
        if len(rows) == 2:
            fit = trainer.fit
            trainer.fit = lambda epochs, phase: (fit(1, phase=phase), 1 / 0)
    with pytest.raises(ZeroDivisionError):
        iterative_prune(trainer, config, on_step=crash_in_step_two)
    assert len(logged) == 2  # steps 0 and 1 logged; step 2 pruned and one epoch fine-tuned
    again = tiny_trainer(tmp_path)
    again.resume()
    assert [r["phase"] for r in again.history].count("prune step 2") == 1
    rows = iterative_prune(again, config, rows=logged)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["phase"] for r in again.history].count("prune step 2") == 2
    assert rows[-1]["gflops"] <= 0.6 * rows[0]["gflops"] * (1 + 1e-9)


def test_cli_nuclei_train_and_sweep(tmp_path):
    cli.main(["train", "--task", "nuclei", "--encoder", "resnet18", "--epochs", "1",
              "--out", str(tmp_path / "trained"), *TINY])
    cli.main(["sweep", "--checkpoint", str(tmp_path / "trained"), "--out", str(tmp_path / "sweep"),
              "--crs", "1", "4", "--finetune-epochs", "1", *TINY])
    for name in ("sweep.md", "sweep.csv", "sweep.json", "sweep.png"):
        assert (tmp_path / "sweep" / name).exists(), name
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sorted((r["scope"], r["cr"]) for r in rows) == [("global", 1), ("global", 4), ("layer", 1), ("layer", 4)]
    assert all(r["sparsity"] == pytest.approx(1 - 1 / r["cr"], abs=1e-3) for r in rows)
