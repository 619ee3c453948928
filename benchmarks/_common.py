"""What every benchmark shares: the heading that makes a result reproducible (machine, date,
commit, torch, threads, command), the thread count pinned, and appending to RESULTS.md when
asked (--append)."""

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import polyprune_ext

RESULTS = Path(__file__).with_name("RESULTS.md")


def add_options(parser: argparse.ArgumentParser, *, threads: bool = True) -> None:
    """--append (write the tables to RESULTS.md) and --threads (pin torch's thread count)."""
    parser.add_argument("--append", action="store_true",
                        help=f"append the tables to {RESULTS.relative_to(RESULTS.parents[1])}")
    if threads:
        parser.add_argument("--threads", type=int, default=None,
                            help="torch threads (default: torch's own, one per core)")


def setup(args: argparse.Namespace) -> None:
    """Pin the thread count the options ask for."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def git_commit() -> str:
    """Short HEAD, "+dirty" if tracked files changed; "no commits yet" in a fresh repository."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True,
                              cwd=RESULTS.parent).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "no commits yet"
    dirty = any(not line.startswith("??") for line in git("status", "--porcelain").splitlines())
    return commit + ("+dirty" if dirty else "")


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{models[0] if models else 'unknown CPU'}, {os.cpu_count()} cores"


def heading(device: str) -> list[str]:
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return [f"## {device}: {machine(device)}, {now}", "", f"- git commit: {git_commit()}",
            f"- torch: {torch.__version__}, threads: {torch.get_num_threads()}",
            f"- build_info: {polyprune_ext.build_info()}",
            f"- command: `python {shlex.join(sys.argv)}`", ""]


def append_if_asked(lines: list[str], args: argparse.Namespace) -> None:
    """Append the tables (already printed) to RESULTS.md with --append."""
    if args.append:
        with RESULTS.open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
        print(f"\nappended to {RESULTS}")
