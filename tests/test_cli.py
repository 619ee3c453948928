"""The polyprune command's failures: each class of mistake is refused before anything loads, with
one line on stderr naming the value or file and what to do, and exit status 2; output folders are
locked and never overwritten; an interrupted or killed run leaves a folder --resume continues."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

smp = pytest.importorskip("segmentation_models_pytorch")

import polyprune_ext  # noqa: E402
from polyprune_ext import _io, cli  # noqa: E402
from polyprune_ext.cli import options  # noqa: E402

TINY = ["--size", "64", "--synthetic-count", "16", "--batch-size", "4"]
SYNTHETIC = ["--data", "synthetic", *TINY]
ROOT = Path(__file__).resolve().parents[1]


def refused(argv, capsys, *, status=2):
    """Run the command, expecting a refusal: its one line on stderr, the last (status lines such
    as the data's may come before it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == status
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "error" in line] == lines[-1:], lines
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint folder from a one-epoch run on tiny synthetic polyps."""
    out = tmp_path_factory.mktemp("runs") / "unet"
    cli.main(["train", "--encoder", "resnet18", "--epochs", "1", "--out", str(out), *SYNTHETIC,
              "--no-progress"])
    return out


@pytest.fixture
def never_loaded(monkeypatch):
    """Fails a test whose command loads a checkpoint or builds a model before refusing."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(options, "load", loaded)
    monkeypatch.setattr(options, "Trainer", loaded)


def make_polyps(root, count=6, size=(40, 48)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        image = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"p{i}.jpg")
        mask = np.zeros(size, dtype=np.uint8)
        mask[10:30, 10:30] = 255
        Image.fromarray(mask).save(root / "masks" / f"p{i}.png")
    return root


# -- values -----------------------------------------------------------------------------------------

BAD_VALUES = [
    (["prune", "--amount", "1.5"], r"argument --amount: must be a fraction between 0 and 1 \(exclusive\), got '1.5'"),
    (["prune", "--amount", "-0.1"], r"argument --amount: must be a fraction .*, got '-0.1'"),
    (["prune", "--step", "0"], r"argument --step: must be a fraction .*, got '0'"),
    (["prune", "--steps", "0"], r"argument --steps: must be a positive integer, got '0'"),
    (["prune", "--score-batches", "x"], r"argument --score-batches: must be a positive integer, got 'x'"),
    (["prune", "--finetune-lr", "0"], r"argument --finetune-lr: must be a positive number"),
    (["prune", "--criterion", "l3"], r"argument --criterion: invalid choice: 'l3'"),
    (["train", "--epochs", "0"], r"argument --epochs: must be a positive integer, got '0'"),
    (["train", "--size", "100"], r"argument --size: must be a positive multiple of 32, got '100'"),
    (["train", "--batch-size", "0"], r"argument --batch-size: must be a positive integer"),
    (["train", "--seed", "-1"], r"argument --seed: must be an integer from 0 to 2\*\*32 - 1"),
    (["train", "--val-count", "-2"], r"argument --val-count: must be an integer >= 0"),
    (["sparsify", "--sparsity", "1"], r"argument --sparsity: must be a fraction"),
    (["sweep", "--crs", "1", "0.5"], r"argument --crs: must be a compression ratio >= 1, got '0.5'"),
    (["bench", "--device", "cuda:7"], r"argument --device: cuda:7: no such CUDA device here"),
    (["bench", "--device", "gpu"], r"argument --device: 'gpu' is not a device"),
    (["train", "--data", "nowhere"], r"argument --data: nowhere is not a folder \(or 'synthetic'"),
]


@pytest.mark.parametrize("argv, message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_a_bad_value_is_refused_while_parsing(argv, message, capsys, tmp_path, trained, never_loaded):
    command = argv[0]
    needs = {"train": ["--out", str(tmp_path / "o")], "bench": [],
             "prune": ["--checkpoint", str(trained), "--out", str(tmp_path / "o")],
             "sparsify": ["--checkpoint", str(trained), "--out", str(tmp_path / "o")],
             "sweep": ["--checkpoint", str(trained), "--out", str(tmp_path / "o")]}[command]
    data = [] if command == "bench" or "--data" in argv else ["--data", "synthetic"]
    line = refused([*argv, *needs, *data], capsys)
    assert re.fullmatch(rf"polyprune {command}: error: {message}.* \(see polyprune {command} --help\)", line)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["train", "prune", "sparsify", "eval", "sweep"])
def test_data_must_be_named_for_every_command_but_demo(command, capsys, tmp_path, trained):
    argv = [command, "--out", str(tmp_path / "o")] if command == "train" else [
        command, "--checkpoint", str(trained), *(["--out", str(tmp_path / "o")] if command != "eval" else [])]
    line = refused(argv, capsys)
    assert "the following arguments are required: --data" in line


def test_a_missing_checkpoint_is_named(capsys, tmp_path):
    line = refused(["eval", "--checkpoint", str(tmp_path), *SYNTHETIC], capsys)
    assert line.startswith(f"polyprune eval: error: argument --checkpoint: no checkpoint at "
                           f"{tmp_path / 'model.safetensors'}: pass the --out folder of `polyprune train`")


# -- output folders ---------------------------------------------------------------------------------


def test_an_unwritable_out_is_refused_before_anything_loads(capsys, tmp_path, never_loaded):
    (tmp_path / "file").write_text("")
    line = refused(["train", "--out", str(tmp_path / "file"), *SYNTHETIC], capsys)
    assert line == f"polyprune train: error: --out {tmp_path / 'file'} is a file, not a folder"
    line = refused(["train", "--out", str(tmp_path / "file" / "run"), *SYNTHETIC], capsys)
    assert line == f"polyprune train: error: cannot write to --out {tmp_path / 'file' / 'run'}: Not a directory"


def test_a_folder_holding_a_run_is_refused_unless_resumed(capsys, tmp_path, trained, never_loaded):
    line = refused(["train", "--out", str(trained), *SYNTHETIC], capsys)
    assert re.fullmatch(rf"polyprune train: error: {trained} already holds a run \(model.safetensors, "
                        r"train_state.pt\): pass --resume to continue it, or choose another --out", line)
    line = refused(["sparsify", "--checkpoint", str(trained), "--out", str(trained), *SYNTHETIC], capsys)
    assert line.endswith("already holds a run (model.safetensors, train_state.pt): choose another --out")
    line = refused(["prune", "--checkpoint", str(trained), "--out", str(tmp_path / "new"), "--resume",
                    *SYNTHETIC], capsys)
    assert line == (f"polyprune prune: error: nothing to resume in {tmp_path / 'new'}: no "
                    "pruning_log.json or train_state.pt")
    assert not (tmp_path / "new").exists()  # the folder it made for nothing is gone again
    line = refused(["prune", "--checkpoint", str(trained), "--out", str(trained), "--resume", *SYNTHETIC],
                   capsys)
    assert line.endswith(f"nothing to resume in {trained}: no pruning_log.json")


def test_a_folder_another_run_writes_is_refused(capsys, tmp_path, never_loaded):
    with _io.locked_folder(tmp_path / "busy"):
        line = refused(["train", "--out", str(tmp_path / "busy"), *SYNTHETIC], capsys)
        assert re.fullmatch(rf"polyprune train: error: {tmp_path / 'busy'} is in use by process "
                            rf"{os.getpid()} on \S+ \(.*, since [\d: -]+\): wait for that run to end, or "
                            "write elsewhere", line)
        assert (tmp_path / "busy" / _io.LOCK_NAME).exists()  # the holder's lock is left alone
    assert not (tmp_path / "busy" / _io.LOCK_NAME).exists()


def test_lock_is_released_and_a_stale_one_taken_over(tmp_path):
    with _io.locked_folder(tmp_path) as stale:
        assert stale is None
        record = json.loads((tmp_path / _io.LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"]
    assert not (tmp_path / _io.LOCK_NAME).exists()
    dead = {"pid": 999999, "host": "elsewhere", "command": "polyprune train", "started": "then"}
    (tmp_path / _io.LOCK_NAME).write_text(json.dumps(dead))  # left by a killed process: no flock held
    with _io.locked_folder(tmp_path) as stale:
        assert stale == dead
    assert not (tmp_path / _io.LOCK_NAME).exists()


# -- data -------------------------------------------------------------------------------------------


def test_damaged_images_are_named_before_anything_loads(capsys, tmp_path, trained, never_loaded):
    data = make_polyps(tmp_path / "polyps")
    (data / "images" / "p1.jpg").write_bytes((data / "images" / "p1.jpg").read_bytes()[:400])
    (data / "images" / "p2.jpg").write_bytes(b"")
    line = refused(["prune", "--checkpoint", str(trained), "--out", str(tmp_path / "o"),
                    "--data", str(data), "--size", "64"], capsys)
    assert line.startswith("polyprune prune: error: 2 problems in the data set: cannot decode "
                           f"{data / 'images' / 'p1.jpg'}: ")
    assert f"cannot decode {data / 'images' / 'p2.jpg'}: " in line
    assert not (tmp_path / "o").exists()


def test_a_mask_of_another_size_is_refused_unless_allowed(capsys, tmp_path, trained):
    data = make_polyps(tmp_path / "polyps")
    Image.fromarray(np.zeros((300, 50), np.uint8)).save(data / "masks" / "p3.png")
    argv = ["eval", "--checkpoint", str(trained), "--data", str(data), "--val-count", "2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(options, "load", lambda *a: pytest.fail("loaded before the data was checked"))
        line = refused(argv, capsys)
    assert line == (f"polyprune eval: error: 1 problem in the data set: {data / 'masks' / 'p3.png'} is "
                    "50x300 but its image is 48x40; allow_resize_masks=True (--allow-resize-masks) "
                    "stretches each mask to its image")
    cli.main([*argv, "--allow-resize-masks"])
    assert 0 <= json.loads(capsys.readouterr().out)["dice"] <= 1


# -- checkpoints ------------------------------------------------------------------------------------


def copy_checkpoint(trained, folder):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes())
    return folder


def test_a_damaged_checkpoint_is_named(capsys, tmp_path, trained):
    broken = copy_checkpoint(trained, tmp_path / "broken")
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    line = refused(["eval", "--checkpoint", str(broken), *SYNTHETIC], capsys)
    assert line.startswith(f"polyprune eval: error: {path} is not a readable safetensors file (")
    assert line.endswith("it may be truncated or overwritten")


def test_weights_that_disagree_with_the_plan_are_summarised(capsys, tmp_path, trained):
    from safetensors.torch import save_file

    other = copy_checkpoint(trained, tmp_path / "other")
    plan = polyprune_ext.structure.read_plan(trained / "model.safetensors")
    model = smp.Unet("resnet34", encoder_weights=None, classes=1)  # another encoder's weights
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, other / "model.safetensors",
              metadata={"polyprune_plan": plan.to_json()})
    line = refused(["eval", "--checkpoint", str(other), *SYNTHETIC], capsys)
    assert re.fullmatch(rf"polyprune eval: error: {other / 'model.safetensors'}: the weights are of another "
                        r"architecture than the model its plan builds \(\d+ tensors\): \d+ unexpected \(e\.g\. .*\)",
                        line)


def test_a_checkpoint_of_another_task_is_refused(capsys, trained):
    line = refused(["eval", "--checkpoint", str(trained), "--task", "nuclei", *SYNTHETIC], capsys)
    assert line == (f"polyprune eval: error: {trained / 'model.safetensors'} holds a polyp model, not a "
                    "nuclei one: leave --task out, or pass --task polyp")


def test_debug_shows_the_traceback(tmp_path, trained, monkeypatch):
    broken = copy_checkpoint(trained, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        cli.main(["eval", "--checkpoint", str(broken), *SYNTHETIC, "--debug"])
    monkeypatch.setenv("POLYPRUNE_DEBUG", "1")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        cli.main(["eval", "--checkpoint", str(broken), *SYNTHETIC])


# -- interruptions ----------------------------------------------------------------------------------


def test_an_interrupted_run_says_how_to_resume_and_unlocks(capsys, tmp_path, trained, monkeypatch):
    def interrupted(self, epochs, *, phase="train"):
        raise KeyboardInterrupt
    monkeypatch.setattr(polyprune_ext.engine.Trainer, "fit", interrupted)
    out = tmp_path / "pruned"
    line = refused(["prune", "--checkpoint", str(trained), "--out", str(out), *SYNTHETIC, "--no-progress",
                    "--amount", "0.2", "--score-batches", "1"], capsys, status=130)
    assert line == f"polyprune prune: error: interrupted; `--resume` continues it from {out}"
    assert not (out / _io.LOCK_NAME).exists()


def start_training(out, epochs):
    command = [sys.executable, "-m", "polyprune_ext.cli", "train", "--encoder", "resnet18", "--epochs",
               str(epochs), "--out", str(out), *SYNTHETIC, "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)


def wait_for_line(process, prefix):
    for line in process.stderr:
        if line.startswith(prefix):
            return line
    pytest.fail(f"the run ended without a line starting {prefix!r}")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_killed_run_resumes_cleanly(how, tmp_path, capsys):
    out = tmp_path / "run"
    process = start_training(out, epochs=3)
    wait_for_line(process, "train epoch 1: loss")  # flushed as the epoch ends
    process.send_signal(getattr(signal, how))
    rest = process.stderr.read()
    assert process.wait(timeout=60) == (143 if how == "SIGTERM" else -signal.SIGKILL)
    if how == "SIGTERM":
        assert rest.strip().endswith(f"error: terminated; `--resume` continues it from {out}")
        assert not (out / _io.LOCK_NAME).exists()
    else:
        assert (out / _io.LOCK_NAME).exists()  # left behind, but no process holds it
    capsys.readouterr()
    cli.main(["train", "--encoder", "resnet18", "--epochs", "2", "--out", str(out), "--resume", *SYNTHETIC,
              "--no-progress"])
    err = capsys.readouterr().err
    if how == "SIGKILL":
        assert re.search(rf"taking over {out}: process {process.pid} on \S+ \(.*\), which locked it, has ended", err)
    assert re.search(r"resumed at epoch [12]", err)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["epoch"] == 2 and not (out / _io.LOCK_NAME).exists()
