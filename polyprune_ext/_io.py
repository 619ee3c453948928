"""Files replaced whole: written under a temporary name in the same folder, then renamed over the
old one, so a crash or a kill leaves the previous file or the new one, never half of either. And
folders locked for one writer at a time."""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, TypeVar, Union

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


LOCK_NAME = ".polyprune.lock"


@contextlib.contextmanager
def locked_folder(folder: PathLike) -> Iterator[Optional[dict]]:
    """Hold ``folder`` (created when missing) for this process alone while the context runs: an
    exclusive lock (flock) on ``folder/.polyprune.lock``, which records the holder (pid, host,
    command, start) and is removed on the way out. A folder another process holds raises
    FileExistsError naming that process. The kernel drops a lock when its process dies, even by
    SIGKILL, so a lock file found unlocked is stale: it is taken over, and the context yields
    its record (None when there was none) for the caller to report."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_record(handle)
            handle.close()
            raise FileExistsError(f"{folder} is in use by {describe_holder(holder)}: wait for that "
                                  "run to end, or write elsewhere") from None
        if path.exists() and path.stat().st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # the holder removed the file while we opened it: lock the new one
    stale = _lock_record(handle)
    handle.seek(0)
    handle.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}, handle)
    handle.flush()
    try:
        yield stale
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: a waiter sees the file is gone
        handle.close()


def _lock_record(handle: IO[str]) -> Optional[dict]:
    handle.seek(0)
    text = handle.read()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return {}


def describe_holder(record: Optional[dict]) -> str:
    """A lock holder in words: "process 123 on host (polyprune train ..., since ...)"."""
    if not record:
        return "another process"
    return (f"process {record.get('pid')} on {record.get('host')} "
            f"({record.get('command')}, since {record.get('started')})")
