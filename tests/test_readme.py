"""The README's examples run as written: every Python block, in order, in one namespace (in a
temporary folder, since they write checkpoints), and every `polyprune` command line parses,
alone or under torchrun."""

import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("segmentation_models_pytorch")

from polyprune_ext import cli  # noqa: E402

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_python_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for number, code in enumerate(blocks("python")):
        exec(compile(code, f"README.md python block {number}", "exec"), namespace)
    assert (tmp_path / "pruned.safetensors").exists()
    assert "with it" in capsys.readouterr().out


def polyprune_commands():
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "polyprune":
                yield words[1:]
            elif words[:1] == ["torchrun"] and "polyprune_ext.cli" in words:
                yield words[words.index("polyprune_ext.cli") + 1:]


@pytest.mark.parametrize("argv", list(polyprune_commands()), ids=" ".join)
def test_command_lines_parse(argv):
    args = cli.parser().parse_args(argv)
    assert callable(args.run)
