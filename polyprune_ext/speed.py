"""Latency and frames per second of a segmentation model, measured one way everywhere.

Pruning is done to reach real-time speed, so speed is measured the way the model will be run:
eval mode, torch.inference_mode(), optionally mixed precision (torch.autocast) and channels_last,
the usual deployment settings on a GPU. The caller's model is never touched: each measurement
runs on a deep copy, so its device, memory format and modes stay as they were.

The protocol (every latency this library reports comes from it): warm-up runs; then timed runs
in chunks until the median is stable (it moved by less than ``tolerance`` when the last chunk
was added) or ``max_repeats`` is reached; the median, p10 and p90 are reported with the number
of runs and the thread count, which ``threads`` pins for the measurement. On a shared machine
two measurements taken at different times are not comparable: ``compare`` times several models
round-robin, chunk by chunk, so that a speed-up is computed from a pair measured under the same
conditions.
"""

import contextlib
import copy
import math
import statistics
import time
from typing import Iterator, Optional, Sequence, Union

import torch

REAL_TIME_FPS = 30

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Device = Union[str, torch.device]


def input_shape(model: torch.nn.Module, batch: int, size: int) -> tuple[int, ...]:
    """(batch, C, size, ...) with C and the number of spatial dims of the model's first conv
    (smp and MONAI models start with one); 2-D RGB when it has none."""
    first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    if first is None:
        return (batch, 3, size, size)
    return (batch, first.in_channels, *[size] * (first.weight.dim() - 2))


def percentile(times: list[float], q: float) -> float:
    """Nearest-rank percentile: a time actually measured, defined for any count >= 1."""
    ordered = sorted(times)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@contextlib.contextmanager
def pinned_threads(threads: Optional[int]) -> Iterator[int]:
    """torch's intra-op thread count set to ``threads`` (when given) for a while; yields it."""
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


class _Runner:
    """A deployment copy of a model and its random input, timed a chunk of runs at a time."""

    def __init__(self, model: torch.nn.Module, batch: int, size: int, device: Device,
                 dtype: torch.dtype, channels_last: bool):
        self.device = torch.device(device)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if self.device.type == "cpu" and dtype == torch.float16:
            raise ValueError("float16 is not supported on the CPU: use float32 or bfloat16")
        if batch < 1:
            raise ValueError(f"need batch >= 1, got {batch}")
        self.net = copy.deepcopy(model).to(self.device).eval()
        self.x = torch.randn(input_shape(self.net, batch, size), device=self.device)
        if channels_last:
            layout = torch.channels_last if self.x.dim() == 4 else torch.channels_last_3d
            self.net = self.net.to(memory_format=layout)
            self.x = self.x.contiguous(memory_format=layout)
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)
        self.times: list[float] = []

    def run(self, count: int, timed: bool = True) -> None:
        with torch.inference_mode(), self.autocast:
            for _ in range(count):
                start = time.perf_counter()
                self.net(self.x)
                if self.device.type == "cuda":  # the kernels, not just their launch
                    torch.cuda.synchronize(self.device)
                if timed:
                    self.times.append((time.perf_counter() - start) * 1000)


def compare(models: dict[str, torch.nn.Module], *, batch: int = 1, size: int = 352,
            device: Device = "cpu", dtype: torch.dtype = torch.float32, channels_last: bool = False,
            threads: Optional[int] = None, warmup: int = 5, repeats: int = 10,
            max_repeats: int = 200, tolerance: float = 0.02) -> dict[str, dict]:
    """latency() rows for several models, timed round-robin: a chunk of ``repeats`` runs of
    each in turn, until every median is stable to ``tolerance`` or ``max_repeats`` runs each."""
    if repeats < 1 or warmup < 0 or max_repeats < repeats:
        raise ValueError(f"need repeats >= 1, warmup >= 0, max_repeats >= repeats; got "
                         f"{repeats}, {warmup}, {max_repeats}")
    runners = {name: _Runner(m, batch, size, device, dtype, channels_last) for name, m in models.items()}
    with pinned_threads(threads) as used:
        for runner in runners.values():
            runner.run(warmup, timed=False)
        stable = False
        while not stable and all(len(r.times) < max_repeats for r in runners.values()):
            medians = [statistics.median(r.times) if r.times else math.inf for r in runners.values()]
            for runner in runners.values():
                runner.run(repeats)
            stable = all(math.isfinite(before) and abs(statistics.median(r.times) - before) <= tolerance * before
                         for r, before in zip(runners.values(), medians))
    return {name: _row(r.times, batch, size, dtype, channels_last, used) for name, r in runners.items()}


def _row(times: list[float], batch: int, size: int, dtype: torch.dtype, channels_last: bool,
         threads: int) -> dict:
    ms = statistics.median(times)
    return {"batch": batch, "size": size, "dtype": str(dtype).removeprefix("torch."),
            "layout": "channels_last" if channels_last else "contiguous", "threads": threads,
            "ms": ms, "ms_p10": percentile(times, 0.1), "ms_p90": percentile(times, 0.9),
            "repeats": len(times), "fps": batch * 1000 / ms}


def latency(model: torch.nn.Module, *, batch: int = 1, size: int = 352, device: Device = "cpu",
            dtype: torch.dtype = torch.float32, channels_last: bool = False,
            threads: Optional[int] = None, warmup: int = 5, repeats: int = 10,
            max_repeats: int = 200, tolerance: float = 0.02) -> dict:
    """Time ``model`` on a random input of ``batch`` images of side ``size`` (channels and
    spatial dims from its first conv), by the protocol of the module docstring.

    float16 / bfloat16 run under torch.autocast (the weights stay float32, as in mixed-precision
    deployment); on the CPU only float32 and bfloat16 (CPU autocast to float16 is slow or
    unsupported for convolutions). On CUDA every run ends with a synchronize, so the time covers
    the kernels, not just their launch.

    Returns {"batch", "size", "dtype", "layout" ("channels_last" or "contiguous"), "threads",
    "ms" (median milliseconds per batch), "ms_p10", "ms_p90", "repeats" (timed runs), "fps"
    (images per second, batch * 1000 / ms)}.
    """
    return compare({"model": model}, batch=batch, size=size, device=device, dtype=dtype,
                   channels_last=channels_last, threads=threads, warmup=warmup, repeats=repeats,
                   max_repeats=max_repeats, tolerance=tolerance)["model"]


def speed_table(model: torch.nn.Module, *, size: int = 352, batches: Sequence[int] = (1, 8),
                device: Device = "cpu", threads: Optional[int] = None, warmup: int = 5,
                repeats: int = 10) -> list[dict]:
    """latency() rows for the settings worth comparing on ``device``.

    Always float32 contiguous (the baseline) for each batch size; on CUDA also float16 and
    bfloat16 with channels_last (how GPUs reach their speed: tensor cores want NHWC); on the CPU
    also float32 channels_last (often faster for convolutions with oneDNN).
    """
    settings = [(torch.float32, False)]
    if torch.device(device).type == "cuda":
        settings += [(torch.float16, True), (torch.bfloat16, True)]
    else:
        settings += [(torch.float32, True)]
    return [latency(model, batch=b, size=size, device=device, dtype=dtype, channels_last=cl,
                    threads=threads, warmup=warmup, repeats=repeats)
            for dtype, cl in settings for b in batches]


def is_real_time(rows: Sequence[dict], size: int = 352) -> bool:
    """True if any row at batch 1 and ``size`` reaches REAL_TIME_FPS: one video frame at a time,
    as it arrives, on the device the rows were measured on. Larger batches do not count: they
    raise throughput but add latency a live video cannot wait for."""
    return any(r["batch"] == 1 and r["size"] == size and r["fps"] >= REAL_TIME_FPS for r in rows)


def format_table(rows: Sequence[dict]) -> str:
    """The rows as a markdown table, one line per row."""
    lines = ["| batch | size | dtype | layout | threads | ms | ms p10 | ms p90 | runs | FPS |",
             "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['size']} | {r['dtype']} | {r['layout']} | {r['threads']} "
                     f"| {r['ms']:.2f} | {r['ms_p10']:.2f} | {r['ms_p90']:.2f} | {r['repeats']} "
                     f"| {r['fps']:.1f} |")
    return "\n".join(lines)
