"""Files replaced whole: written under a temporary name in the same folder, then renamed over the
old one, so a crash or a kill leaves the previous file or the new one, never half of either."""

import os
from pathlib import Path
from typing import Any, Callable, Union

import torch

PathLike = Union[str, Path]


def replace_atomically(path: PathLike, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` writes the new content to ``tmp``; it then replaces ``path`` in one rename.
    A failed write leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: PathLike, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def save_torch(obj: Any, path: PathLike) -> None:
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))
