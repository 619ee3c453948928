"""Files replaced whole: written under a temporary name in the same folder, then renamed over the
old one, so a crash or a kill leaves the previous file or the new one, never half of either."""

import os
from pathlib import Path
from typing import Any, Callable, TypeVar, Union

import torch

PathLike = Union[str, Path]
T = TypeVar("T")


def replace_atomically(path: PathLike, write: Callable[[Path], T]) -> T:
    """``write(tmp)`` writes the new content to ``tmp``; it then replaces ``path`` in one rename
    and its result is returned. A failed write (an exception in ``write``: a check that refused
    the content, too) leaves no temporary file behind and ``path`` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        result = write(tmp)
        tmp.replace(path)
        return result
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: PathLike, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def save_torch(obj: Any, path: PathLike) -> None:
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))
