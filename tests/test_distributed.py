"""Training, pruning and fine-tuning on two processes (gloo, CPU) end where one process over the
same global batches ends; rank 0 alone writes, the checkpoint loads in one process, every rank
resumes; and the polyprune command under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("segmentation_models_pytorch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import polyprune_ext  # noqa: E402
from polyprune_ext.engine import PruneConfig, TrainConfig, Trainer, iterative_prune  # noqa: E402
from polyprune_ext.tasks.polyp import TASK, SyntheticPolyps  # noqa: E402
from polyprune_ext.testing import process_group  # noqa: E402

# Largest difference over a tensor's largest value, 2 processes against 1 (float32 sums in another
# order, 8 AdamW steps and a prune between): measured 5.7e-7.
TOLERANCE = 1e-5


class Net(torch.nn.Module):
    """A small U-Net-like model with per-channel GroupNorm: normalised per sample, so a process's
    share of a batch is normalised as in the whole batch (train-mode BatchNorm is not: on GPUs,
    SyncBatchNorm makes it so). The convs before a norm have no bias, which the norm would cancel:
    its gradient would be rounding noise, which AdamW scales up to full steps. ``unused`` is never
    called, as in smp's PSPNet."""

    def __init__(self, width=8):
        super().__init__()
        self.width = width
        block = lambda i, o: torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1, bias=False),  # noqa: E731
                                                 torch.nn.GroupNorm(o, o), torch.nn.ReLU())
        self.down, self.mid, self.up = block(3, width), block(width, 2 * width), block(3 * width, width)
        self.head = torch.nn.Conv2d(width, 1, 1)
        self.unused = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        skip = self.down(x)
        y = self.mid(torch.nn.functional.max_pool2d(skip, 2))
        y = torch.nn.functional.interpolate(y, scale_factor=2.0)
        return self.head(self.up(torch.cat([skip, y], 1)))


polyprune_ext.register_model_family("test-ddp-net", Net, lambda m: {"width": m.width} if isinstance(m, Net) else None)


def train_prune_finetune(out_dir):
    """One training epoch, one prune (-30% FLOPs, TaylorFO on 2 batches), one fine-tuning
    epoch, over 16 synthetic polyps (no augmentation) in global batches of 4."""
    torch.manual_seed(0)
    data = SyntheticPolyps(16, size=32)
    trainer = Trainer(Net(), TASK, data, SyntheticPolyps(4, size=32, seed=1), TrainConfig(batch_size=4, lr=3e-3),
                      out_dir=out_dir, progress=False)
    trainer.fit(1)
    iterative_prune(trainer, PruneConfig(amount=0.3, steps=1, score_batches=2, finetune_epochs=1))
    return trainer


def _rank(rank, world, init_file, out_dir):
    with process_group(rank, world, init_file):
        trainer = train_prune_finetune(out_dir)
        torch.save(trainer.model.state_dict(), out_dir / f"rank{rank}.pt")
        torch.distributed.barrier()  # rank 0's checkpoint is written
        again = Trainer(Net(), TASK, SyntheticPolyps(16, size=32), SyntheticPolyps(4, size=32, seed=1),
                        TrainConfig(batch_size=4), out_dir=out_dir, progress=False)
        again.resume()
        for name, value in again.model.state_dict().items():
            assert torch.equal(value, trainer.model.state_dict()[name]), name
        assert again.epoch == 2 and again.optimizer.state_dict()["state"].keys() == \
            trainer.optimizer.state_dict()["state"].keys()


def test_two_processes_end_where_one_process_over_the_global_batch_ends(tmp_path):
    torch.multiprocessing.spawn(_rank, args=(2, tmp_path / "init", tmp_path / "ddp"), nprocs=2)
    one = train_prune_finetune(tmp_path / "one").model.state_dict()
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    saved = polyprune_ext.load(tmp_path / "ddp" / "model.safetensors").state_dict()  # in one process
    assert saved.keys() == one.keys()
    assert [v.shape for v in saved.values()] != [v.shape for v in Net().state_dict().values()]  # pruned
    for name, expected in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank holds the same model
        assert torch.equal(saved[name], ranks[0][name]), name
        error = (saved[name] - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
        assert error <= TOLERANCE, (name, error.item())
    history = [(r["phase"], r["epoch"]) for r in json.loads(torch.load(
        tmp_path / "ddp" / "train_state.pt", weights_only=True)["history"])]
    assert history == [("train", 1), ("prune step 1", 2)]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == \
        ["model.safetensors", "rank0.pt", "rank1.pt", "train_state.pt"]  # rank 0 alone wrote


def test_the_command_under_torchrun(tmp_path):
    """polyprune train, then prune, each on 2 processes started by torchrun (gloo)."""
    common = ["--data", "synthetic", "--size", "32", "--synthetic-count", "16", "--batch-size", "4",
              "--no-progress", "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "polyprune_ext.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for command in (["train", "--encoder", "resnet18", "--epochs", "1", "--out", str(tmp_path / "trained")],
                    ["prune", "--checkpoint", str(tmp_path / "trained"), "--out", str(tmp_path / "pruned"),
                     "--amount", "0.3", "--steps", "1", "--score-batches", "1", "--finetune-epochs", "1"]):
        done = subprocess.run(torchrun + command + common, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "pruned" / "pruning_log.json").read_text())
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["gflops"] <= 0.7 * rows[0]["gflops"] * (1 + 1e-9)
    assert "dice" in done.stdout and done.stdout.count("report:") == 1  # rank 0 alone printed
    assert not list(tmp_path.glob("*/*.tmp"))
    model = polyprune_ext.load(tmp_path / "pruned" / "model.safetensors")
    assert polyprune_ext.model_stats(model, torch.randn(1, 3, 32, 32)).gflops == pytest.approx(rows[1]["gflops"])


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch, capsys):
    from polyprune_ext import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", "--size", "32"])
    assert exit.value.code == 2
    assert "polyprune bench runs in one process: start it without torchrun" in capsys.readouterr().err
