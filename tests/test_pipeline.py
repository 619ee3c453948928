"""Training, iterative pruning, magnitude pruning and the polyprune command, end to end on tiny
synthetic runs (64x64, a few images, one epoch: behaviour, not accuracy)."""

import copy
import json
import re

import pytest
import torch

smp = pytest.importorskip("segmentation_models_pytorch")

import polyprune_ext  # noqa: E402
from polyprune_ext import cli, model_stats  # noqa: E402
from polyprune_ext.engine import PruneConfig, TrainConfig, Trainer, iterative_prune  # noqa: E402
from polyprune_ext.models import smp_model  # noqa: E402
from polyprune_ext.structure import read_plan  # noqa: E402
from polyprune_ext.tasks.polyp import TASK, SyntheticPolyps  # noqa: E402
from polyprune_ext.unstructured import magnitude  # noqa: E402

TINY = ["--data", "synthetic", "--size", "64", "--synthetic-count", "16", "--batch-size", "4", "--no-progress"]


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
    assert all(0 <= r["dice_recalibrated"] <= 1 for r in rows[1:])  # and after re-calibration
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


OPTIONS = {
    "train": "task data size val-count synthetic-count batch-size workers allow-resize-masks arch encoder "
             "model-args encoder-weights epochs lr out resume device seed no-progress sync-bn debug",
    "prune": "checkpoint out resume criterion grad reduce target threads amount step steps scope "
             "score-batches round-to normalize-layers flops-weighted bn-recal-images mixing-norms "
             "finetune-epochs finetune-lr task data size val-count synthetic-count batch-size workers "
             "allow-resize-masks device seed no-progress sync-bn debug",
    "sparsify": "checkpoint out sparsity scope bn-recal-images finetune-epochs finetune-lr task data size "
                "val-count synthetic-count batch-size workers allow-resize-masks device seed no-progress debug",
    "eval": "checkpoint task data size val-count synthetic-count batch-size workers allow-resize-masks "
            "device seed debug",
    "bench": "checkpoint arch encoder model-args size batch-size runtime threads warmup device debug",
    "sweep": "checkpoint out resume crs scopes bn-recal-images finetune-epochs finetune-lr one-shot "
             "keep-first keep-last biases task data size val-count synthetic-count batch-size workers "
             "allow-resize-masks device seed no-progress debug",
    "demo": "data size val-count synthetic-count batch-size workers allow-resize-masks arch encoder "
            "model-args encoder-weights epochs lr amount step score-batches bn-recal-images finetune-epochs "
            "finetune-lr threads out device seed no-progress debug",
}


@pytest.mark.parametrize("command", OPTIONS)
def test_every_command_explains_itself(command, capsys):
    """--help lists the options the command uses, no other, each saying its default."""
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: polyprune {command}")
    sub = cli.parser()._subparsers._group_actions[0].choices[command]
    actions = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert sorted(a.option_strings[0][2:] for a in actions) == sorted(OPTIONS[command].split())
    for action in actions:
        assert action.help, action.dest
        if action.nargs != 0 and not action.required:  # flags are off unless given
            assert "default" in action.help, f"{command} {action.option_strings[0]}: {action.help}"


def test_cli_train_prune_eval(tmp_path, capsys):
    cli.main(["train", "--arch", "Unet", "--encoder", "resnet18", "--epochs", "1",
              "--out", str(tmp_path / "trained"), *TINY])
    cli.main(["prune", "--checkpoint", str(tmp_path / "trained"), "--out", str(tmp_path / "pruned"),
              "--amount", "0.3", "--step", "0.3", "--score-batches", "1", "--finetune-epochs", "1", *TINY])
    for name in ("report.md", "pruning_log.csv", "pruning_log.json", "dice_vs_flops.png", "model.safetensors"):
        assert (tmp_path / "pruned" / name).exists(), name
    rows = json.loads((tmp_path / "pruned" / "pruning_log.json").read_text())
    assert rows[-1]["gflops"] <= 0.7 * rows[0]["gflops"] * (1 + 1e-9)
    # latency only from the pair timed round-robin at the end
    assert [("ms" in r) for r in rows] == [True] + [False] * (len(rows) - 2) + [True]
    assert "speed-up" in (tmp_path / "pruned" / "report.md").read_text()
    capsys.readouterr()
    cli.main(["eval", "--checkpoint", str(tmp_path / "pruned"), *TINY[:-1]])  # no progress bars to turn off
    assert 0 <= json.loads(capsys.readouterr().out)["dice"] <= 1
    cli.main(["sparsify", "--checkpoint", str(tmp_path / "trained"), "--out", str(tmp_path / "sparse"),
              "--sparsity", "0.5", "--finetune-epochs", "1", *TINY])
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_iterative_pruning_to_a_latency_target(tmp_path, monkeypatch):
    """The goal is the latency the device's latency model predicts; the rows carry it."""
    monkeypatch.setenv("POLYPRUNE_CACHE", str(tmp_path / "cache"))
    trainer = tiny_trainer(None)
    config = PruneConfig(target="latency", amount=0.3, steps=1, score_batches=1, finetune_epochs=0,
                         bn_recal_images=0, latency_threads=1)
    rows = iterative_prune(trainer, config)
    assert len(rows) == 2 and "dice_recalibrated" not in rows[1]
    assert rows[1]["predicted_ms"] <= 0.7 * rows[0]["predicted_ms"] * (1 + 1e-9)
    assert list((tmp_path / "cache").glob("latency-*.json"))  # measured once, cached


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
    cli.main(["eval", "--checkpoint", str(tmp_path / "pruned"), *TINY[:-1]])
    assert 0 <= json.loads(capsys.readouterr().out)["dice"] <= 1
    with pytest.raises(SystemExit):  # not a JSON object: argparse says so
        cli.main(["train", "--arch", "monai.UNet", "--model-args", "[8, 16]", "--out", str(tmp_path / "x")])


def channels(model):
    return sum(g.size for g in polyprune_ext.analyze(model, torch.zeros(1, 3, 64, 64)).groups)


def test_interrupted_pruning_resumes_where_it_stopped(tmp_path):
    """A crash during step 2's fine-tuning: resuming finishes that step and reaches the target."""
    trainer = tiny_trainer(tmp_path)
    config = PruneConfig(amount=0.4, steps=2, score_batches=1, finetune_epochs=2)
    logged, after_step_one = [], []

    def crash_in_step_two(rows):
        logged[:] = [dict(r) for r in rows]
        if len(rows) == 2:
            after_step_one.append(channels(trainer.model))
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
    assert rows[-1]["removed_channels"] == after_step_one[0] - channels(again.model) > 0


def test_a_kill_between_the_two_checkpoint_writes_resumes_one_consistent_epoch(tmp_path, monkeypatch):
    """Killed after a prune step's model.safetensors is written and before its train_state.pt:
    the resume point is the whole previous epoch (its model, its optimizer state), not a pruned
    model paired with the unpruned model's optimizer state."""
    trainer = tiny_trainer(tmp_path)
    trainer.fit(1)
    before = copy.deepcopy(trainer.model).eval()
    analysis = polyprune_ext.analyze(trainer.model, torch.zeros(1, 3, 64, 64))
    keep = {i: torch.arange(g.size // 2) for i, g in enumerate(analysis.groups) if g.prunable and g.size > 1}
    trainer.plan.prune_(trainer.model, analysis, keep, trainer.optimizer)

    def killed(obj, path):
        raise KeyboardInterrupt
    monkeypatch.setattr(polyprune_ext._io, "save_torch", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(1)
    monkeypatch.undo()
    assert len(read_plan(tmp_path / "model.safetensors").steps) == 1  # the model file moved on
    again = tiny_trainer(tmp_path)
    again.resume()
    assert again.epoch == 1 and again.plan.steps == [] and len(again.history) == 1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.model.eval()(x), before(x), rtol=0, atol=0)
    again.fit(1)  # the optimizer state fits the model's parameters: training goes on
    assert again.epoch == 2


def test_every_epoch_is_a_line_on_stderr(tmp_path, capsys):
    tiny_trainer(None).fit(2, phase="fine-tune")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["fine-tune epoch 1", "fine-tune epoch 2"]
    assert all(re.fullmatch(r"fine-tune epoch \d: loss \d+\.\d{4}, dice \d\.\d{4} \(\d+ s\)", line)
               for line in lines)


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
