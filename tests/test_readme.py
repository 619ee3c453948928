"""The README's examples run as written: every Python block, in order, in one namespace (in a
temporary folder, since they write checkpoints), and every `polyprune` command line, in order, on
small folders laid out where the README says its data is, with a few options appended to keep
it small (argparse takes the last of a repeated option); the torchrun lines parse."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("segmentation_models_pytorch")

from polyprune_ext import cli  # noqa: E402

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# Appended to each command: tiny images, sets, models and schedules.
SMALL = {
    "train": "--size 64 --val-count 2 --batch-size 4 --encoder resnet18 --epochs 1 --no-progress",
    "prune": "--size 64 --val-count 2 --batch-size 4 --score-batches 1 --finetune-epochs 1 --no-progress",
    "eval": "--size 64 --val-count 2 --batch-size 4",
    "bench": "--size 64 --batch-size 2",
    "sparsify": "--val-count 2 --batch-size 4 --finetune-epochs 1 --no-progress",
    "sweep": "--size 64 --val-count 2 --batch-size 4 --crs 1 4 --finetune-epochs 1 --no-progress",
    "export": "--size 64",
    "infer": "--size 64 --device cpu --no-progress",
}


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_python_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for number, code in enumerate(blocks("python")):
        exec(compile(code, f"README.md python block {number}", "exec"), namespace)
    assert (tmp_path / "pruned.safetensors").exists()
    assert "with it" in capsys.readouterr().out


def command_lines(launcher):
    """The arguments of every ``polyprune ...`` line (launcher "polyprune") or of every
    ``torchrun ... -m polyprune_ext.cli ...`` line (launcher "torchrun")."""
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["polyprune"] == [launcher]:
                yield words[1:]
            elif words[:1] == ["torchrun"] == [launcher] and "polyprune_ext.cli" in words:
                yield words[words.index("polyprune_ext.cli") + 1:]


def make_kvasir(root, count=8):
    """images/ and masks/ as in Kvasir-SEG: JPEG frames and masks, sizes varying by frame."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        height, width = 40 + 4 * i, 56 - 2 * i
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[10:30, 12:40] = 255
        Image.fromarray(mask).save(root / "masks" / f"{i}.jpg")


def make_dsb(root, count=8):
    """The DSB 2018 layout: <id>/images/<id>.png and one mask per nucleus in <id>/masks/."""
    rng = np.random.default_rng(1)
    for i in range(count):
        (root / f"s{i}" / "images").mkdir(parents=True)
        (root / f"s{i}" / "masks").mkdir()
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / f"s{i}" / "images" / f"s{i}.png")
        for k, (r, c) in enumerate([(5, 5), (20, 24), (30, 8)]):
            mask = np.zeros((48, 48), dtype=np.uint8)
            mask[r:r + 10, c:c + 12] = 255
            Image.fromarray(mask).save(root / f"s{i}" / "masks" / f"m{k}.png")


def make_video(path, frames=6):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        for i in range(frames):
            image = np.full((48, 64, 3), 20 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def test_command_lines_run_in_order(tmp_path, monkeypatch, capsys):
    commands = list(command_lines("polyprune"))
    assert [c[0] for c in commands] == ["train", "train", "prune", "eval", "bench", "export", "bench",
                                        "infer", "infer", "sparsify", "train", "sweep"]
    make_kvasir(tmp_path / "kvasir-seg")
    make_dsb(tmp_path / "dsb2018-stage1-test")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # ../kvasir-seg and ../dsb2018-stage1-test, as written
    make_video(tmp_path / "work" / "colonoscopy.mp4")
    for argv in commands:
        cli.main([*argv, *SMALL[argv[0]].split()])
    for out in ("unet", "monai-unet", "unet-50", "sparse", "nuclei", "sweep"):
        assert any((tmp_path / "work" / "runs" / out).iterdir()), out
    assert "real-time" in capsys.readouterr().out


@pytest.mark.parametrize("argv", list(command_lines("torchrun")), ids=" ".join)
def test_torchrun_lines_parse(argv, tmp_path, monkeypatch):
    make_kvasir(tmp_path / "kvasir-seg", count=2)
    (tmp_path / "work" / "runs" / "unet").mkdir(parents=True)
    (tmp_path / "work" / "runs" / "unet" / "model.safetensors").touch()  # parsing checks only that it is there
    monkeypatch.chdir(tmp_path / "work")
    argv = [word.replace("/shared/", f"{tmp_path}/") for word in argv]  # the two-node line's shared storage
    assert callable(cli.parser().parse_args(argv).run)
